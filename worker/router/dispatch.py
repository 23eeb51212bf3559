"""One request through the pools: prefill on a prompt worker, decode on a token worker (or both on a mixed one)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

import grpc

from phasesplit.v1.conventions import KV_PEER_FAILED
from phasesplit.router.metrics import RouterMetrics
from phasesplit.router.openai_api import APIError, unavailable
from phasesplit.router.pools import Pools
from phasesplit.router.scheduling import pick_mixed_worker, pick_prompt_worker, pick_token_worker
from phasesplit.router.workers import WorkerState
from phasesplit.v1 import worker_pb2 as pb

log = logging.getLogger(__name__)


@dataclass
class Job:
    request_id: str
    prompt_token_ids: list[int]
    sampling: pb.SamplingParams
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class Delta:
    token_ids: list[int]
    text: str
    finish_reason: str = ""


@dataclass
class Timing:
    route: str = ""
    prompt_worker: str = ""
    token_worker: str = ""
    first_token: float | None = None
    last_token: float | None = None
    completion_tokens: int = 0
    prefill: str = "-"   # the prompt worker's own queue/prefill/transfer seconds


def worker_error(e: grpc.aio.AioRpcError, worker: WorkerState) -> APIError:
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return APIError(400, details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return unavailable(f"worker {worker.address} cannot take the request: {code.name}: {details}")
    return APIError(502, f"worker {worker.address} failed: {code.name}: {details}", type="server_error",
                    code="worker_error")


class TokenWorkerFailed(Exception):
    """The prompt worker could not hand the KV to the token worker; `error` is what the client gets."""

    def __init__(self, error: APIError):
        super().__init__(error.message)
        self.error = error


class Dispatcher:
    def __init__(self, pools: Pools, metrics: RouterMetrics):
        self.pools, self.metrics = pools, metrics
        self._cleanup: set[asyncio.Task] = set()

    async def run(self, job: Job) -> AsyncIterator[Delta]:
        """Yields the request's output; closing the iterator early cancels the request on every worker."""
        route = self.pools.route()
        if route is None:
            self.metrics.requests.labels(outcome="rejected").inc()
            raise unavailable(self.pools.why_not())
        timing, outcome = Timing(route=route), "error"
        steps = self._split(job, timing) if route == "split" else self._mixed(job, timing)
        try:
            async with aclosing(steps):
                async for delta in steps:
                    self._observe(job, timing, delta)
                    if delta.finish_reason:
                        outcome = "success"   # even if the caller closes us right after this last delta
                    yield delta
        except (asyncio.CancelledError, GeneratorExit):
            if outcome != "success":
                outcome = "cancelled"
            raise
        finally:
            self.metrics.requests.labels(outcome=outcome).inc()
            elapsed = time.monotonic() - job.arrival
            if outcome == "success":
                self.metrics.latency.observe(elapsed)
            log.debug("request %s %s route=%s prompt_worker=%s token_worker=%s prompt_tokens=%d "
                      "completion_tokens=%d ttft=%s e2e=%.4f prompt_phase=[%s]", job.request_id, outcome, route,
                      timing.prompt_worker, timing.token_worker, len(job.prompt_token_ids),
                      timing.completion_tokens,
                      f"{timing.first_token - job.arrival:.4f}" if timing.first_token else "-", elapsed,
                      timing.prefill)

    def _observe(self, job: Job, timing: Timing, delta: Delta) -> None:
        n = len(delta.token_ids)
        if not n:
            return
        now = time.monotonic()
        if timing.first_token is None:
            timing.first_token = now
            self.metrics.ttft.observe(now - job.arrival)
            n -= 1
        elif timing.last_token is not None:
            for _ in range(n):
                self.metrics.tbt.observe((now - timing.last_token) / n)
        timing.last_token = now
        timing.completion_tokens += len(delta.token_ids)

    # ---- split: prompt worker then token worker ----
    async def _split(self, job: Job, timing: Timing) -> AsyncIterator[Delta]:
        tried: list[str] = []
        while True:
            token_w = pick_token_worker(self.pools["token"].workers.values(), exclude=tried)
            if token_w is None:
                raise unavailable("no token worker is ready" + (f" (tried {', '.join(tried)})" if tried else ""))
            tried.append(token_w.address)
            try:
                async with aclosing(self._split_on(job, token_w, timing)) as deltas:
                    async for delta in deltas:
                        yield delta
                return
            except TokenWorkerFailed as e:  # raised before any output: safe to run again elsewhere
                if len(tried) >= 2:
                    raise e.error from None
                log.info("token worker %s failed the KV transfer of %s; retrying with another", token_w.address,
                         job.request_id)

    async def _split_on(self, job: Job, token_w: WorkerState, timing: Timing) -> AsyncIterator[Delta]:
        timing.token_worker = token_w.address
        token_w.reserve(job.request_id, math.ceil((len(job.prompt_token_ids) + 1) / token_w.block_size))
        token_w.inflight += 1
        finished = False
        try:
            reply = await self._prefill(job, token_w, timing)
            token_w.settle(job.request_id)
            if reply.finish_reason:
                # Before the yield: a caller that has its last delta closes us right there. The prompt
                # worker already dropped the transfer; this also frees KV that no Generate will claim.
                finished = True
                self._abort_later(token_w, job.request_id)
                yield Delta([reply.first_token], reply.first_text, reply.finish_reason)
                return
            yield Delta([reply.first_token], reply.first_text)
            remaining = max(job.sampling.max_tokens - 1, 0)
            request = pb.GenerateRequest(request_id=job.request_id, sampling=job.sampling,
                                         first_token=reply.first_token)
            async with aclosing(self._generate(token_w, "token", request, remaining)) as events:
                async for delta in events:
                    finished = bool(delta.finish_reason)
                    yield delta
        finally:
            token_w.inflight -= 1
            token_w.unreserve(job.request_id)
            if not finished:
                self._abort_later(token_w, job.request_id)

    async def _prefill(self, job: Job, token_w: WorkerState, timing: Timing) -> pb.PrefillReply:
        tried: list[str] = []
        n = len(job.prompt_token_ids)
        request = pb.PrefillRequest(request_id=job.request_id, prompt_token_ids=job.prompt_token_ids,
                                    sampling=job.sampling, token_worker=token_w.address)
        while True:
            prompt_w = pick_prompt_worker(self.pools["prompt"].workers.values(), exclude=tried)
            if prompt_w is None:
                raise unavailable("no prompt worker is ready" + (f" (tried {', '.join(tried)})" if tried else ""))
            tried.append(prompt_w.address)
            timing.prompt_worker = prompt_w.address
            phase = self.metrics.phase("prompt", n)
            prompt_w.pending_tokens += n
            prompt_w.inflight += 1
            answered = False
            call = prompt_w.prompt.Prefill(request)
            try:
                reply = await call
                answered = True
            except grpc.aio.AioRpcError as e:
                answered = True
                if any(key == KV_PEER_FAILED for key, _ in e.trailing_metadata() or ()):
                    raise TokenWorkerFailed(worker_error(e, token_w)) from None
                if e.code() == grpc.StatusCode.UNAVAILABLE and len(tried) < 2:
                    log.info("prompt worker %s unavailable for %s; retrying on another", prompt_w.address,
                             job.request_id)
                    continue
                raise worker_error(e, prompt_w) from None
            finally:
                phase.close()
                prompt_w.pending_tokens -= n
                prompt_w.inflight -= 1
                if not answered:
                    call.cancel()
                    self._abort_later(prompt_w, job.request_id)
            timing.prefill = (f"queue={reply.queue_seconds:.4f} prefill={reply.prefill_seconds:.4f} "
                              f"transfer={reply.transfer_seconds:.4f} kv_bytes={reply.kv_bytes}")
            self.metrics.kv_transfer_bytes.inc(reply.kv_bytes)
            self.metrics.kv_transfer_seconds.inc(reply.transfer_seconds)
            return reply

    # ---- mixed: both phases on one worker ----
    async def _mixed(self, job: Job, timing: Timing) -> AsyncIterator[Delta]:
        tried: list[str] = []
        request = pb.GenerateRequest(request_id=job.request_id, sampling=job.sampling,
                                     prompt_token_ids=job.prompt_token_ids)
        while True:
            worker = pick_mixed_worker(self.pools["mixed"].workers.values(), exclude=tried)
            if worker is None:
                raise unavailable("no mixed worker is ready")
            tried.append(worker.address)
            timing.prompt_worker = timing.token_worker = worker.address
            worker.pending_tokens += len(job.prompt_token_ids)
            worker.inflight += 1
            started = False
            try:
                async with aclosing(self._generate(worker, "mixed", request, len(job.prompt_token_ids))) as events:
                    async for delta in events:
                        if not started:
                            started = True
                            worker.pending_tokens -= len(job.prompt_token_ids)
                        yield delta
                return
            except APIError as e:
                if started or e.status != 503 or len(tried) >= 2:
                    raise
                log.info("mixed worker %s unavailable for %s; retrying on another", worker.address, job.request_id)
            finally:
                worker.inflight -= 1
                if not started:
                    worker.pending_tokens -= len(job.prompt_token_ids)

    async def _generate(self, worker: WorkerState, pool: str, request: pb.GenerateRequest,
                        queued_tokens: int) -> AsyncIterator[Delta]:
        """Relays one Generate stream; the prompt's tokens count as queued (mixed) or the output still to come (token)."""
        phase = self.metrics.phase(pool, queued_tokens)
        call = worker.token.Generate(request)
        finished = False
        try:
            async for event in call:
                phase.started()
                if pool == "token":
                    phase.consume(len(event.token_ids))
                else:
                    phase.consume(queued_tokens)
                if event.finish_reason == "abort":
                    raise APIError(502, f"worker {worker.address} aborted the request", type="server_error",
                                   code="worker_error")
                finished = bool(event.finish_reason)
                yield Delta(list(event.token_ids), event.text, event.finish_reason)
                if finished:
                    return
            raise APIError(502, f"worker {worker.address} ended the stream without a finish reason",
                           type="server_error", code="worker_error")
        except grpc.aio.AioRpcError as e:
            raise worker_error(e, worker) from None
        finally:
            phase.close()
            if not finished:
                call.cancel()
                self._abort_later(worker, request.request_id)

    def _abort_later(self, worker: WorkerState, request_id: str) -> None:
        """Abort in a task of its own: it must run even while the request's own task is being cancelled."""
        task = asyncio.get_running_loop().create_task(worker.abort(request_id))
        self._cleanup.add(task)
        task.add_done_callback(self._cleanup.discard)

    async def drain_cleanup(self) -> None:
        while self._cleanup:
            await asyncio.gather(*list(self._cleanup), return_exceptions=True)
