"""A deterministic in-process test double of a prompt, token or mixed worker over real gRPC.

Output token i of a request is prompt_token_ids[i % len(prompt)]: the prompt echoed back. The prompt
role "pushes KV" to the token worker named in Prefill by a real PushKV call carrying only the header,
so the token worker can echo the rest.
"""

from __future__ import annotations

import asyncio
import math

import grpc

from phasesplit.v1 import worker_pb2 as pb
from phasesplit.v1 import worker_pb2_grpc as pb_grpc

BLOCK_SIZE = 16
MODEL = "tiny"
ADMIN_TOKEN = "admin-token"  # what the test routers are started with (PHASESPLIT_ADMIN_TOKEN)


def echo(prompt: list[int], i: int) -> int:
    return prompt[i % len(prompt)]


def expected_output(prompt: list[int], max_tokens: int, eos: set[int] = frozenset()) -> list[int]:
    out = []
    for i in range(max_tokens):
        out.append(echo(prompt, i))
        if out[-1] in eos:
            break
    return out


class FakeWorker(pb_grpc.PromptWorkerServicer, pb_grpc.TokenWorkerServicer, pb_grpc.WorkerServicer):
    def __init__(self, role: str, tokenizer, *, num_kv_blocks: int = 1000, prefill_delay: float = 0.0,
                 token_delay: float = 0.0):
        self.role, self.tokenizer = role, tokenizer
        self.num_kv_blocks, self.prefill_delay, self.token_delay = num_kv_blocks, prefill_delay, token_delay
        self.eos = set(tokenizer.eos_token_ids)
        self.prefills: list[pb.PrefillRequest] = []
        self.generates: list[pb.GenerateRequest] = []
        self.aborted: list[str] = []
        self.active: set[str] = set()            # requests being prefilled or generated right now
        self.kv: dict[str, pb.KVHeader] = {}      # pushed KV not yet claimed by Generate
        self.extra_waiting_tokens = 0             # pretend queue, as Load reports it
        self.extra_running = 0                    # pretend decode batch, as Load reports it
        self.max_running_requests = 0             # the batch limit Load reports (0: none)
        self.refuse_prefill = False               # answer Prefill with UNAVAILABLE, as a draining worker does
        self.draining = False
        self.address = ""
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
        await self._server.stop(None)

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _finish(self, token: int, produced: int, sampling: pb.SamplingParams) -> str:
        if token in self.eos and not sampling.ignore_eos:
            return "stop"
        return "length" if produced >= sampling.max_tokens else ""

    # ---- PromptWorker ----
    async def Prefill(self, request: pb.PrefillRequest, context) -> pb.PrefillReply:
        self.prefills.append(request)
        if self.refuse_prefill or self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is draining")
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        self.active.add(rid)
        self._prefilling[rid] = len(prompt)
        try:
            await asyncio.sleep(self.prefill_delay)
            first = echo(prompt, 0)
            finish = self._finish(first, 1, request.sampling)
            if not finish:
                header = pb.KVHeader(request_id=rid, prompt_token_ids=prompt, first_token=first)
                async with grpc.aio.insecure_channel(request.token_worker) as channel:
                    await pb_grpc.TokenWorkerStub(channel).PushKV(iter([pb.KVChunk(header=header)]))
            return pb.PrefillReply(first_token=first, first_text=self._text(first), finish_reason=finish,
                                   prefill_seconds=self.prefill_delay, transfer_seconds=0.001,
                                   kv_bytes=1024 * len(prompt))
        finally:
            self.active.discard(rid)
            self._prefilling.pop(rid, None)

    # ---- TokenWorker ----
    async def PushKV(self, request_iterator, context) -> pb.PushKVReply:
        chunks = 0
        async for chunk in request_iterator:
            chunks += 1
            if chunk.HasField("header"):
                self.kv[chunk.header.request_id] = chunk.header
        self._kv_arrived.set()
        return pb.PushKVReply(chunks_received=chunks)

    async def Generate(self, request: pb.GenerateRequest, context):
        self.generates.append(request)
        rid, sampling = request.request_id, request.sampling
        if request.prompt_token_ids:
            prompt, start = list(request.prompt_token_ids), 0
        else:
            header = await self._claim(rid)
            if header is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no KV arrived for {rid}")
            prompt, start = list(header.prompt_token_ids), 1
        self.active.add(rid)
        try:
            for i in range(start, sampling.max_tokens):
                await asyncio.sleep(self.token_delay)
                if rid in self.aborted:
                    yield pb.TokenEvent(finish_reason="abort")
                    return
                token = echo(prompt, i)
                finish = self._finish(token, i + 1, sampling)
                yield pb.TokenEvent(token_ids=[token], text=self._text(token), finish_reason=finish)
                if finish:
                    return
        finally:
            self.active.discard(rid)

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
        layout = pb.KVLayout(model="tiny", dtype="float32", num_layers=2, num_kv_heads=2, head_dim=16,
                             block_size=BLOCK_SIZE)
        return pb.WorkerInfo(role=self.role, model="tiny", layout=layout, max_model_len=2048,
                             num_kv_blocks=self.num_kv_blocks, version="fake")

    async def Load(self, request, context) -> pb.WorkerLoad:
        used = sum(math.ceil((len(h.prompt_token_ids) + 1) / BLOCK_SIZE) for h in self.kv.values())
        used += len(self.active)
        return pb.WorkerLoad(waiting_requests=len(self._prefilling),
                             waiting_tokens=sum(self._prefilling.values()) + self.extra_waiting_tokens,
                             running_requests=len(self.active) + self.extra_running, kv_blocks_used=used,
                             max_running_requests=self.max_running_requests,
                             kv_blocks_free=self.num_kv_blocks - used, pending_transfers=len(self.kv),
                             draining=self.draining)

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortReply:
        self.aborted.append(request.request_id)
        found = self.kv.pop(request.request_id, None) is not None or request.request_id in self.active
        return pb.AbortReply(found=found)

    async def Drain(self, request, context) -> pb.DrainReply:
        self.draining = True
        return pb.DrainReply(in_flight=len(self.active))
