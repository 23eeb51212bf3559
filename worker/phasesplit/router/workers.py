"""One worker as the router sees it: its gRPC stubs, its polled load and the router's own accounting."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc

from phasesplit import auth
from phasesplit.prefix_hash import HASH_NAME
from phasesplit.router.cache_view import CacheView
from phasesplit.v1 import worker_pb2 as pb
from phasesplit.v1 import worker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


def any_tokenizer(digest: str) -> bool:
    return True


class WorkerState:
    def __init__(self, address: str, pool: str, accepts_tokenizer: Callable[[str], bool] = any_tokenizer):
        self.address, self.pool = address, pool
        self.accepts_tokenizer = accepts_tokenizer   # whether the router's token ids mean the same on this worker
        self.channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self.prompt = pb_grpc.PromptWorkerStub(self.channel)
        self.token = pb_grpc.TokenWorkerStub(self.channel)
        self.worker = pb_grpc.WorkerStub(self.channel)
        self.metadata = auth.call_metadata(auth.ROUTER)  # sent with every call: the workers' Guard checks it
        self.info: pb.WorkerInfo | None = None
        self.load: pb.WorkerLoad | None = None
        self.error = "not polled yet"
        self.pending_tokens = 0          # prompt tokens sent by this router and not answered
        self.inflight = 0                # this router's requests on the worker
        self.last_picked = 0             # tie-break: least recently picked first
        self.polls = 0                   # Load polls begun
        self.answered_at = 0.0           # monotonic time of the last Load poll answered
        self._reserved: dict[str, int] = {}   # request id -> KV blocks not yet visible in `load`
        self._settling: dict[str, int] = {}   # request id -> polls begun before its KV landed
        self.cache = CacheView()              # the block hashes its prefix cache holds

    # ---- state the scheduler reads ----
    @property
    def ready(self) -> bool:
        return self.info is not None and self.load is not None and not self.load.draining and self.serves_pool

    @property
    def routable(self) -> bool:
        return self.ready and self.accepts_tokenizer(self.info.tokenizer_digest)

    def why_not_routable(self) -> str:
        if self.error:
            return self.error
        if not self.serves_pool:
            return f"role {self.info.role}"
        if self.ready and not self.routable:
            return f"its tokenizer {self.info.tokenizer_digest[:12]} is not the router's"
        return "not polled yet"

    @property
    def serves_pool(self) -> bool:
        return self.info is None or self.info.role in (self.pool, "mixed")

    @property
    def queued_prompt_tokens(self) -> int:
        polled = self.load.waiting_tokens if self.load else 0
        return max(self.pending_tokens, polled)

    @property
    def free_blocks(self) -> int:
        polled = self.load.kv_blocks_free if self.load else 0
        return polled - sum(self._reserved.values())

    @property
    def max_batch(self) -> int:
        """The worker's batch limit (0: not reported)."""
        return self.load.max_running_requests if self.load else 0

    @property
    def busy_slots(self) -> int:
        """Batch slots taken: polled running requests, or this router's requests on it when more."""
        return max(self.inflight, self.load.running_requests if self.load else 0)

    @property
    def block_size(self) -> int:
        return (self.info.layout.block_size if self.info else 0) or 16

    @property
    def caches_prefixes(self) -> bool:
        """Whether its prefix cache hashes blocks as the router does (the router uses this worker's block size)."""
        return self.info is not None and self.info.prefix_hash == HASH_NAME

    def cached_tokens(self, hashes: list[int]) -> int:
        """The prompt tokens its cache holds of a prompt whose full blocks (of this worker's size) have `hashes`."""
        return self.cache.cached_blocks(hashes) * self.block_size if self.caches_prefixes else 0

    def expect_cached(self, hashes: list[int]) -> None:
        """A prompt phase ran here: its full blocks are cached now, whatever the last poll said."""
        if self.caches_prefixes:
            self.cache.expect(hashes, self.polls)

    def forget_cached(self, hashes: list[int]) -> None:
        """It turned out not to hold these blocks (evicted since the last poll said otherwise)."""
        self.cache.forget(hashes)

    # ---- the router's KV reservations ----
    def reserve(self, request_id: str, blocks: int) -> None:
        self._reserved[request_id] = blocks

    def settle(self, request_id: str) -> None:
        """The KV has landed: drop the reservation once a poll begun after now has answered."""
        if request_id in self._reserved:
            self._settling[request_id] = self.polls

    def unreserve(self, request_id: str) -> None:
        self._reserved.pop(request_id, None)
        self._settling.pop(request_id, None)

    def assign(self, request_id: str, prompt_tokens: int = 0, kv_blocks: int = 0) -> "Assignment":
        """`with worker.assign(...)`: the request counts on this worker (in flight, its prompt tokens queued,
        its KV blocks reserved) until the block ends, on every path."""
        return Assignment(self, request_id, prompt_tokens, kv_blocks)

    # ---- polling ----
    async def poll(self, timeout: float) -> None:
        self.polls += 1
        index = self.polls
        try:
            if self.info is None:
                self.info = await self.worker.Info(pb.InfoRequest(), timeout=timeout, metadata=self.metadata)
                if not self.serves_pool:
                    log.warning("worker %s has role %r and cannot serve the %s pool",
                                self.address, self.info.role, self.pool)
                if self.info.prefix_hash and not self.caches_prefixes:
                    log.warning("worker %s hashes its prefix-cache blocks with %r, this router with %r: requests "
                                "are not routed by its cache", self.address, self.info.prefix_hash, HASH_NAME)
            self.load = await self.worker.Load(self.cache.request(), timeout=timeout, metadata=self.metadata)
            if self.caches_prefixes and self.load.HasField("prefix_cache"):
                self.cache.apply(self.load.prefix_cache, index)
            else:
                self.cache.clear()
            self.answered_at = time.monotonic()
            self.error = "draining" if self.load.draining else ""
        except grpc.aio.AioRpcError as e:
            self.load, self.error = None, f"{e.code().name}: {e.details()}"
        for rid, begun_before in list(self._settling.items()):
            if begun_before < index:
                self.unreserve(rid)

    def mark_down(self, error: str) -> None:
        """The worker failed a request as a dead or stalled one does: no new work until a poll answers."""
        self.load, self.error = None, error

    async def abort(self, request_id: str, timeout: float = 2.0) -> None:
        try:
            await self.worker.Abort(pb.AbortRequest(request_id=request_id), timeout=timeout,
                                    metadata=self.metadata)
        except grpc.aio.AioRpcError as e:
            log.debug("abort of %s on %s failed: %s", request_id, self.address, e.code().name)

    async def close(self) -> None:
        await self.channel.close()

    def describe(self) -> dict:
        load = self.load
        return {
            "address": self.address,
            "role": self.info.role if self.info else None,
            "routable": self.routable,
            "error": self.error or None,
            "inflight": self.inflight,
            "kv_blocks_used": load.kv_blocks_used if load else None,
            "kv_blocks_free": load.kv_blocks_free if load else None,
            "waiting_tokens": load.waiting_tokens if load else None,
            "streams_ended": dict(load.streams_ended) if load else None,   # Generate streams, by how they ended
        }


class Assignment:
    """One request's share of a worker's accounting, given back in one place when the request leaves it."""

    def __init__(self, worker: WorkerState, request_id: str, prompt_tokens: int, kv_blocks: int):
        self.worker, self.request_id = worker, request_id
        self.prompt_tokens, self.kv_blocks = prompt_tokens, kv_blocks

    def __enter__(self) -> "Assignment":
        if self.kv_blocks:
            self.worker.reserve(self.request_id, self.kv_blocks)
        self.worker.pending_tokens += self.prompt_tokens
        self.worker.inflight += 1
        return self

    def prompt_done(self) -> None:
        """The worker has taken the prompt in (answered it, or started the output): it is no longer queued."""
        self.worker.pending_tokens -= self.prompt_tokens
        self.prompt_tokens = 0

    def kv_landed(self) -> None:
        self.worker.settle(self.request_id)

    def __exit__(self, *exc) -> bool:
        self.prompt_done()
        self.worker.inflight -= 1
        if self.kv_blocks:
            self.worker.unreserve(self.request_id)
        return False
