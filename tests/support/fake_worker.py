"""A deterministic in-process test double of a prompt, token or mixed worker over real gRPC.

The next token is a function of the whole sequence so far (`next_token`), as a greedy model's is,
so a request resumed elsewhere over its own output continues exactly. The prompt role "pushes KV"
to the token worker named in Prefill by a real PushKV call carrying only the header. As a real
token worker does, it refuses KV for a request id it aborted. Faults on demand: `kill()` stops the
server (in-flight streams break as a dead process's do), `stall()` stops answering until `resume()`,
`fail_after_tokens` with `failure` breaks a Generate stream after that many tokens (or, "pause",
holds it for `pause_seconds` while the worker still answers its polls).
"""

from __future__ import annotations

import asyncio
import collections
import math

import grpc

from phasesplit.engine.tokenizer import tokenizer_digest
from phasesplit.logs import request_id_from_metadata
from phasesplit.prefix_hash import block_hashes
from phasesplit.v1 import worker_pb2 as pb
from phasesplit.v1.conventions import KV_PEER_FAILED
from phasesplit.v1 import worker_pb2_grpc as pb_grpc

BLOCK_SIZE = 16
MODEL = "tiny"
ADMIN_TOKEN = "admin-token"  # what the test routers are started with (PHASESPLIT_ADMIN_TOKEN)


def next_token(sequence: list[int]) -> int:
    return sequence[len(sequence) // 2]


def expected_output(prompt: list[int], max_tokens: int, eos: set[int] = frozenset()) -> list[int]:
    sequence = list(prompt)
    for _ in range(max_tokens):
        sequence.append(next_token(sequence))
        if sequence[-1] in eos:
            break
    return sequence[len(prompt):]


def _prompt_hashes(prompt_token_ids, sampling: pb.SamplingParams) -> list[int]:
    salt = sampling.cache_salt if sampling.HasField("cache_salt") else None
    return block_hashes(list(prompt_token_ids), BLOCK_SIZE, salt)


class FakeWorker(pb_grpc.PromptWorkerServicer, pb_grpc.TokenWorkerServicer, pb_grpc.WorkerServicer):
    def __init__(self, role: str, tokenizer, *, num_kv_blocks: int = 1000, prefill_delay: float = 0.0,
                 token_delay: float = 0.0, tokenizer_files: dict[str, bytes] | None = None, prefix_hash: str = ""):
        self.role, self.tokenizer = role, tokenizer
        self.tokenizer_files = tokenizer_files     # served by TokenizerFiles, with their digest in Info
        self.tokenizer_reads = 0
        self.num_kv_blocks, self.prefill_delay, self.token_delay = num_kv_blocks, prefill_delay, token_delay
        self.eos = set(tokenizer.eos_token_ids)
        self.prefills: list[pb.PrefillRequest] = []
        self.generates: list[pb.GenerateRequest] = []
        self.aborted: list[str] = []
        self.log_ids: list[str] = []              # the x-request-id metadata of each Prefill and Generate
        self.active: set[str] = set()            # requests being prefilled or generated right now
        self.streams_ended: collections.Counter[str] = collections.Counter()   # Generate streams, by finish reason
        self.kv: dict[str, pb.KVHeader] = {}      # pushed KV not yet claimed by Generate
        self.extra_waiting_tokens = 0             # pretend queue, as Load reports it
        self.extra_running = 0                    # pretend decode batch, as Load reports it
        self.max_running_requests = 0             # the batch limit Load reports (0: none)
        self.refuse_prefill = False               # answer Prefill with UNAVAILABLE, as a draining worker does
        self.fail_after_push = False              # push the KV, then fail Prefill as a worker dying right then
        self.draining = False
        self.prefix_hash = prefix_hash             # Info's prefix_hash: "" reports no prefix cache
        self.cached_hashes: set[int] = set()       # the blocks its pretend prefix cache holds, as Load reports them
        self.evicted = False                       # a token worker whose cache lost them since: KV counting on
                                                   # held blocks is refused (NOT_FOUND), as a real one does
        self.refuse_pushes = False                 # every push refused with NOT_FOUND, whatever it counts on
        self.fail_after_tokens: int | None = None  # break the next Generate stream after this many tokens
        self.failure = "kill"                      # how: kill | stall | end (no finish reason) | abort (event) | pause
        self.pause_seconds = 0.0                   # how long a "pause" holds the stream
        self.tombstones: set[str] = set()          # aborted request ids, whose KV is refused
        self.address = ""
        self._running = asyncio.Event()
        self._running.set()
        self._kv_arrived = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self._prefilling: dict[str, int] = {}

    async def start(self) -> str:
        self._server = grpc.aio.server()
        pb_grpc.add_WorkerServicer_to_server(self, self._server)
        if self.role in ("prompt", "mixed"):
            pb_grpc.add_PromptWorkerServicer_to_server(self, self._server)
        if self.role in ("token", "mixed"):
            pb_grpc.add_TokenWorkerServicer_to_server(self, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self.address = f"127.0.0.1:{port}"
        return self.address

    async def stop(self) -> None:
        self._running.set()
        await self._server.stop(None)

    async def kill(self) -> None:
        """As SIGKILL looks from outside: every stream breaks, nothing answers on the port any more."""
        await self._server.stop(0)

    def stall(self) -> None:
        """As SIGSTOP looks from outside: nothing answers (streams, polls, aborts) until resume()."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    async def _alive(self) -> None:
        await self._running.wait()

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _finish(self, token: int, produced: int, sampling: pb.SamplingParams) -> str:
        if token in self.eos and not sampling.ignore_eos:
            return "stop"
        return "length" if produced >= sampling.max_tokens else ""

    # ---- PromptWorker ----
    async def Prefill(self, request: pb.PrefillRequest, context) -> pb.PrefillReply:
        await self._alive()
        self.prefills.append(request)
        self.log_ids.append(request_id_from_metadata(context, ""))
        if self.refuse_prefill or self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is draining")
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        self.active.add(rid)
        self._prefilling[rid] = len(prompt)
        try:
            await asyncio.sleep(self.prefill_delay)
            first = next_token(prompt)
            finish = self._finish(first, 1, request.sampling)
            if not finish:
                header = pb.KVHeader(request_id=rid, prompt_token_ids=prompt, first_token=first,
                                     num_cached_blocks=request.token_cached_blocks)
                async with grpc.aio.insecure_channel(request.token_worker) as channel:
                    try:
                        await pb_grpc.TokenWorkerStub(channel).PushKV(iter([pb.KVChunk(header=header)]))
                    except grpc.aio.AioRpcError as e:
                        context.set_trailing_metadata(((KV_PEER_FAILED, request.token_worker),))
                        await context.abort(e.code(), f"KV transfer to {request.token_worker}: {e.details()}")
                if self.fail_after_push:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost")
            return pb.PrefillReply(first_token=first, first_text=self._text(first), finish_reason=finish,
                                   prefill_seconds=self.prefill_delay, transfer_seconds=0.001,
                                   kv_bytes=1024 * len(prompt), num_cached_tokens=self._cached(request))
        finally:
            self.active.discard(rid)
            self._prefilling.pop(rid, None)

    def _cached(self, request: pb.PrefillRequest) -> int:
        """Its pretend prefix cache's hit on the prompt (counted when it reports one), then holding it all."""
        if not self.prefix_hash:
            return 0
        hashes = _prompt_hashes(request.prompt_token_ids, request.sampling)
        hits = 0
        while hits < min(len(hashes), (len(request.prompt_token_ids) - 1) // BLOCK_SIZE) \
                and hashes[hits] in self.cached_hashes:
            hits += 1
        self.cached_hashes.update(hashes)
        return hits * BLOCK_SIZE

    # ---- TokenWorker ----
    async def PushKV(self, request_iterator, context) -> pb.PushKVReply:
        chunks = 0
        await self._alive()
        async for chunk in request_iterator:
            chunks += 1
            if chunk.HasField("header"):
                if chunk.header.request_id in self.tombstones:
                    await context.abort(grpc.StatusCode.ABORTED, f"request {chunk.header.request_id} was aborted; "
                                                                 "its KV is refused")
                if (chunk.header.num_cached_blocks and self.evicted) or self.refuse_pushes:
                    await context.abort(grpc.StatusCode.NOT_FOUND, "the leading blocks are no longer cached")
                self.kv[chunk.header.request_id] = chunk.header
        self._kv_arrived.set()
        return pb.PushKVReply(chunks_received=chunks)

    async def Generate(self, request: pb.GenerateRequest, context):
        await self._alive()
        self.generates.append(request)
        self.log_ids.append(request_id_from_metadata(context, ""))
        rid, sampling = request.request_id, request.sampling
        if request.prompt_token_ids:
            sequence, produced = list(request.prompt_token_ids), 0
        else:
            header = await self._claim(rid)
            if header is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no KV arrived for {rid}")
            sequence, produced = list(header.prompt_token_ids) + [header.first_token], 1
        prompt = sequence[:len(sequence) - produced]
        fail_after, self.fail_after_tokens = self.fail_after_tokens, None
        self.active.add(rid)
        try:
            for i in range(produced, sampling.max_tokens):
                if fail_after is not None and i - produced == fail_after:
                    if self.failure == "pause":   # a busy worker: the stream waits, polls still answer
                        await asyncio.sleep(self.pause_seconds)
                    else:
                        async for event in self._fail():
                            yield event
                        return
                await asyncio.sleep(self.token_delay)
                await self._alive()
                if rid in self.aborted:
                    self.streams_ended["abort"] += 1
                    yield pb.TokenEvent(finish_reason="abort")
                    return
                token = next_token(sequence)
                sequence.append(token)
                finish = self._finish(token, i + 1, sampling)
                if finish:
                    self.streams_ended[finish] += 1
                    if self.prefix_hash:   # its decode leaves the prompt cached: reported this late at the latest
                        self.cached_hashes.update(_prompt_hashes(prompt, sampling))
                yield pb.TokenEvent(token_ids=[token], text=self._text(token), finish_reason=finish)
                if finish:
                    return
        finally:
            self.active.discard(rid)

    async def _fail(self):
        if self.failure == "abort":
            yield pb.TokenEvent(finish_reason="abort")
        elif self.failure == "kill":
            asyncio.get_running_loop().create_task(self.kill())
            await asyncio.sleep(10)
        elif self.failure == "stall":
            self.stall()
            await self._alive()

    async def _claim(self, rid: str) -> pb.KVHeader | None:
        for _ in range(50):
            if rid in self.kv:
                return self.kv.pop(rid)
            self._kv_arrived.clear()
            try:
                await asyncio.wait_for(self._kv_arrived.wait(), 0.1)
            except TimeoutError:
                pass
        return None

    # ---- Worker ----
    async def Info(self, request, context) -> pb.WorkerInfo:
        await self._alive()
        layout = pb.KVLayout(model="tiny", dtype="float32", num_layers=2, num_kv_heads=2, head_dim=16,
                             block_size=BLOCK_SIZE)
        digest = tokenizer_digest(self.tokenizer_files) if self.tokenizer_files else ""
        return pb.WorkerInfo(role=self.role, model="tiny", layout=layout, max_model_len=2048,
                             num_kv_blocks=self.num_kv_blocks, version="fake", tokenizer_digest=digest,
                             prefix_hash=self.prefix_hash)

    async def TokenizerFiles(self, request, context):
        await self._alive()
        if not self.tokenizer_files:
            await context.abort(grpc.StatusCode.NOT_FOUND, "the model directory has no tokenizer.json")
        self.tokenizer_reads += 1
        for name, data in self.tokenizer_files.items():
            yield pb.FileChunk(name=name, data=data)

    async def Load(self, request, context) -> pb.WorkerLoad:
        await self._alive()
        used = sum(math.ceil((len(h.prompt_token_ids) + 1) / BLOCK_SIZE) for h in self.kv.values())
        used += len(self.active)
        return pb.WorkerLoad(waiting_requests=len(self._prefilling),
                             waiting_tokens=sum(self._prefilling.values()) + self.extra_waiting_tokens,
                             running_requests=len(self.active) + self.extra_running, kv_blocks_used=used,
                             max_running_requests=self.max_running_requests,
                             kv_blocks_free=self.num_kv_blocks - used, pending_transfers=len(self.kv),
                             draining=self.draining, streams_ended=self.streams_ended,
                             prefix_cache=pb.PrefixCacheSummary(epoch="fake", full=True, stored=self.cached_hashes)
                             if self.prefix_hash else None)

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortReply:
        await self._alive()
        self.aborted.append(request.request_id)
        self.tombstones.add(request.request_id)
        found = self.kv.pop(request.request_id, None) is not None or request.request_id in self.active
        return pb.AbortReply(found=found)

    async def Drain(self, request, context) -> pb.DrainReply:
        self.draining = True
        return pb.DrainReply(in_flight=len(self.active))
