"""What a worker's failure means for a request: the request's own fault (an APIError to answer), or the
worker's (`WorkerLost`: another worker may take the request over)."""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from phasesplit.router.openai_api import APIError, unavailable
from phasesplit.router.workers import WorkerState
from phasesplit.v1.conventions import KV_PEER_FAILED


class WorkerLost(Exception):
    """A worker failed a request in a way another worker can take over. `down`: it looks dead or stalled."""

    def __init__(self, worker: WorkerState, reason: str, error: APIError, down: bool = False, blame: bool = True):
        super().__init__(error.message)
        self.worker, self.reason, self.error, self.down = worker, reason, error, down
        self.blame = blame  # False: the worker may take the request's next attempt, which is not counted


def worker_failed(worker: WorkerState, what: str) -> APIError:
    """A 502 saying what the worker did: "worker ADDRESS {what}"."""
    return APIError(502, f"worker {worker.address} {what}", type="server_error", code="worker_error")


def worker_error(e: grpc.aio.AioRpcError, worker: WorkerState) -> APIError:
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return APIError(400, details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return unavailable(f"worker {worker.address} cannot take the request: {code.name}: {details}")
    return worker_failed(worker, f"failed: {code.name}: {details}")


def lost_in_stream(e: grpc.aio.AioRpcError, worker: WorkerState) -> WorkerLost | APIError:
    """What a failed Generate means."""
    code = e.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return worker_error(e, worker)
    if code == grpc.StatusCode.UNAVAILABLE:
        return WorkerLost(worker, "worker_unavailable", worker_error(e, worker), down=True)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return WorkerLost(worker, "worker_full", worker_error(e, worker))
    return WorkerLost(worker, "worker_error", worker_error(e, worker))


def lost_in_prefill(e: grpc.aio.AioRpcError, prompt_w: WorkerState, token_w: WorkerState,
                    held_blocks: int) -> WorkerLost | APIError:
    """What a failed Prefill means: the KV push to the token worker failed, the prompt worker is gone, or the
    request is refused. A push that counted on `held_blocks` the token worker no longer holds (its prefix
    cache evicted them since its last poll: NOT_FOUND) is a cache miss, no fault of the worker's: sent
    again with every block, the request goes through."""
    if _peer_failed(e):
        if held_blocks and e.code() == grpc.StatusCode.NOT_FOUND:
            return WorkerLost(token_w, "kv_cache_miss", worker_error(e, token_w), blame=False)
        return WorkerLost(token_w, "kv_transfer_failed", worker_error(e, token_w))
    if e.code() == grpc.StatusCode.UNAVAILABLE:
        return WorkerLost(prompt_w, "prompt_worker_unavailable", worker_error(e, prompt_w), down=True)
    return worker_error(e, prompt_w)


def _peer_failed(e: grpc.aio.AioRpcError) -> bool:
    """Whether the prompt worker says the KV could not be handed to the token worker."""
    return any(key == KV_PEER_FAILED for key, _ in e.trailing_metadata() or ())


def no_worker(pool: str, failed: Iterable[str]) -> APIError:
    failed = sorted(failed)
    return unavailable(f"no {pool} worker is ready" + (f" (failed: {', '.join(failed)})" if failed else ""))


def request_lost(failure: str, why: str) -> APIError:
    """The request lost its worker (`failure`: "worker (reason)") and cannot go on elsewhere."""
    return unavailable(f"the request lost its worker ({failure}) and {why}")
