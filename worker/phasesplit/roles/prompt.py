"""`PromptWorker.Prefill`: the prompt phase, with the KV streamed to the token worker layer by layer.

The request joins the engine's batches as a prefill-only request. While the batch runs, the
engine's `layer_hook` hands each finished layer's blocks to the request's KV sender, so the
transfer overlaps the rest of the prefill. The blocks stay held until the token worker has
acknowledged every chunk (or the transfer is aborted), then they are released.

The router may say that the token worker already holds the prompt's first blocks in its prefix cache
(`token_cached_blocks`): the header says so (`num_cached_blocks`) and only the blocks after them move."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import grpc

from phasesplit.engine.handoff import KVHandoff
from phasesplit.logs import request_id_from_metadata
from phasesplit.v1.conventions import KV_PEER_FAILED
from phasesplit.roles.convert import sampling_from_proto
from phasesplit.roles.core import WorkerCore
from phasesplit.roles.engine_loop import Finished
from phasesplit.roles.remote_abort import RemoteAborts
from phasesplit.roles.shard_send import LeaderShards, ShardRun
from phasesplit.roles.streaming import submit_or_abort
from phasesplit.transport.base import KVSender, TransferError, max_cached_blocks, status_of
from phasesplit.v1 import worker_pb2 as pb
from phasesplit.v1 import worker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PrefillTiming:
    """perf_counter() instants of one request's prompt phase and transfer."""
    arrived: float
    first_layer: float = 0.0
    last_layer: float = 0.0
    first_token: float = 0.0
    transfer_opened: float = 0.0
    acknowledged: float = 0.0
    kv_bytes: int = 0
    layers_sent: list = field(default_factory=list)


@dataclass(slots=True)
class _Transfer:
    timing: PrefillTiming
    layerwise: bool
    sender: KVSender | None = None
    shards: ShardRun | None = None  # the other tensor-parallel ranks' transfers
    blocks_sent: dict[int, int] = field(default_factory=dict)  # by layer: the blocks queued so far
    held_blocks: int = 0  # leading blocks the token worker holds already: each layer is sent from there


class PromptService(pb_grpc.PromptWorkerServicer):
    def __init__(self, core: WorkerCore, transport, on_timing=None):
        self.core = core
        self.transport = transport
        self.on_timing = on_timing  # called with (request_id, PrefillTiming) after each Prefill
        self._transfers: dict[str, _Transfer] = {}
        self._lock = threading.Lock()
        self.remote_aborts = RemoteAborts()
        self.shards = LeaderShards(core) if core.engine.tp.size > 1 else None
        core.engine.layer_hook = self._on_layer

    # ---- engine thread ----

    def _on_layer(self, layer: int, request_ids: list[str]) -> None:
        now = time.perf_counter()
        engine = self.core.engine
        for rid in request_ids:
            transfer = self._transfers.get(rid)
            if transfer is None:
                continue
            if not transfer.timing.first_layer:
                transfer.timing.first_layer = now
            transfer.timing.last_layer = now
            if transfer.layerwise and transfer.sender is not None:
                # from the first block not sent yet: a prefix found in the cache goes with the first chunk
                first, block_ids = engine.prefill_piece(rid, transfer.blocks_sent.get(layer, transfer.held_blocks))
                if not block_ids:  # a chunk that ends inside the blocks the token worker holds
                    continue
                transfer.sender.send_layer(layer, *engine.kv_layer(layer), block_ids, first)
                transfer.blocks_sent[layer] = first + len(block_ids)

    # ---- gRPC threads ----

    def Prefill(self, request, context):
        self.core.refuse_if_draining(context)
        with self.core.tracked():
            return self._prefill(request, context)

    def _prefill(self, request, context) -> pb.PrefillReply:
        timing = PrefillTiming(arrived=time.perf_counter())
        rid = request.request_id
        params = self._validate(request, context)
        ids = list(request.prompt_token_ids)
        log.info("request %s: prefill of %d prompt tokens", rid, len(ids),
                 extra={"request_id": request_id_from_metadata(context, rid)})
        # A request that cannot outlive its first token (max_tokens=1) has no token phase: no KV moves.
        transfer = _Transfer(timing, self.core.settings.layerwise and params.max_tokens > 1,
                             held_blocks=request.token_cached_blocks)
        with self._lock:
            self._transfers[rid] = transfer
        if transfer.layerwise:
            handoff = dataclasses.replace(KVHandoff.of_prompt(rid, ids, self.core.engine.layout, params.cache_salt),
                                          num_cached_blocks=transfer.held_blocks)
            self._open(request, context, transfer, handoff)
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        engine = self.core.engine
        try:
            submit_or_abort(self.core, context, rid, outputs.put,
                            lambda: engine.add_request(rid, ids, params, prefill_only=True))
        except BaseException:
            self._drop(rid, abort_sender=True)
            raise
        done = threading.Event()
        if not context.add_callback(lambda: done.is_set() or self.abort(rid)):
            self.abort(rid)
        try:
            out = outputs.get()
            timing.first_token = time.perf_counter()
            if isinstance(out, Finished):
                self._drop(rid, abort_sender=True)
                code = grpc.StatusCode.CANCELLED if out.finish_reason == "abort" else grpc.StatusCode.INTERNAL
                context.abort(code, out.error or f"request {rid} was aborted")
            first_token = out.token_ids[0]
            if out.finish_reason:  # ends at its first token: no token phase
                self._end_early(request, transfer)
            else:
                if transfer.sender is None:
                    handoff, block_ids = self.core.loop.run(lambda: (engine.handoff(rid), engine.blocks_of(rid)))
                    handoff = dataclasses.replace(handoff, num_cached_blocks=transfer.held_blocks)
                    self._open(request, context, transfer, handoff, block_ids)
                    self._send_all_layers(transfer, block_ids)
                self._finish(request, transfer, context, timing)
            reply = pb.PrefillReply(first_token=first_token, first_text=out.text, finish_reason=out.finish_reason or "",
                                    queue_seconds=max(0.0, (timing.first_layer or timing.first_token) - timing.arrived),
                                    prefill_seconds=timing.first_token - (timing.first_layer or timing.arrived),
                                    transfer_seconds=max(0.0, timing.acknowledged - timing.transfer_opened),
                                    kv_bytes=timing.kv_bytes, num_cached_tokens=out.num_cached_tokens,
                                    **_blocks_moved(transfer, len(ids), engine.layout.block_size))
        finally:
            done.set()
            self._release(rid)
        if self.on_timing is not None:
            self.on_timing(rid, timing)
        return reply

    def close(self) -> None:
        self.remote_aborts.close()

    def abort(self, request_id: str) -> bool:
        """Stops the request's transfer (the token worker frees its side), then frees it here."""
        found = self._drop(request_id, abort_sender=True)
        return self.core.loop.abort(request_id).result() or found

    # ---- helpers ----

    def _validate(self, request, context):
        if not request.request_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must be a non-empty string")
        if not request.token_worker:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "token_worker: must be host:port of the token worker")
        most = max_cached_blocks(len(request.prompt_token_ids), self.core.engine.layout.block_size)
        if request.token_cached_blocks > most:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"token_cached_blocks: must be in [0, {most}] (the prompt's full blocks short of the one "
                          f"holding its last token), got {request.token_cached_blocks}")
        try:
            return sampling_from_proto(request.sampling)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sampling.{exc}")

    def _open(self, request, context, transfer: _Transfer, handoff: KVHandoff,
              block_ids: list[int] | None = None) -> None:
        """Opens this rank's transfer, and the other ranks' (which, given `block_ids`, send every layer at once)."""
        transfer.timing.transfer_opened = time.perf_counter()
        try:
            transfer.sender = self.transport.open(request.token_worker, handoff.to_proto())
        except (ValueError, TransferError) as exc:
            self._drop(request.request_id, abort_sender=False)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"KV transfer to {request.token_worker}: {exc}")
        if self.shards is not None:
            transfer.shards = self.shards.open(request.token_worker, handoff, block_ids)

    def _send_all_layers(self, transfer: _Transfer, block_ids: list[int]) -> None:
        """Serialized transfer: every layer after the prompt phase (the blocks are held, untouched)."""
        engine, first = self.core.engine, transfer.held_blocks
        for layer in range(engine.layout.num_layers):
            transfer.sender.send_layer(layer, *engine.kv_layer(layer), block_ids[first:], first)

    def _finish(self, request, transfer: _Transfer, context, timing: PrefillTiming) -> None:
        rid = request.request_id
        try:
            result = transfer.sender.finish()
            shard_bytes = transfer.shards.result(self.core.settings.kv_transfer_timeout) if transfer.shards else 0
        except TransferError as exc:
            self._drop(rid, abort_sender=True)
            context.set_trailing_metadata(((KV_PEER_FAILED, request.token_worker),))
            context.abort(status_of(exc), f"KV transfer to {request.token_worker}: {exc}")
        timing.acknowledged = time.perf_counter()
        timing.kv_bytes = result.bytes + shard_bytes
        self._drop(rid, abort_sender=False)

    def _end_early(self, request, transfer: _Transfer) -> None:
        """Stops the transfer, and tells the token worker the request is over (before the router can):
        it frees what already arrived, even KV it committed, and refuses what is still on the way."""
        opened = transfer.sender is not None
        self._drop(request.request_id, abort_sender=True)
        if opened:
            self.remote_aborts.send(request.token_worker, request.request_id)

    def _drop(self, rid: str, abort_sender: bool) -> bool:
        with self._lock:
            transfer = self._transfers.pop(rid, None)
        if transfer is not None and transfer.sender is not None and abort_sender:
            transfer.sender.abort()
        if transfer is not None and transfer.shards is not None and abort_sender:
            self.shards.abort(rid, transfer.shards, self.core.settings.kv_transfer_timeout)
        return transfer is not None

    def _release(self, rid: str) -> None:
        # Only after the sender stopped reading the blocks (finish or abort returned). Queued, not
        # awaited: the reply must not wait for the engine's current step (another batch's prefill).
        self.core.loop.call(self.core.engine.release, rid)


def _blocks_moved(transfer: _Transfer, num_tokens: int, block_size: int) -> dict[str, int]:
    """PrefillReply's counts of the prompt blocks the transfer moved and those the token worker held (none
    when no KV moved)."""
    if not transfer.timing.kv_bytes:
        return {}
    num_blocks = -(-num_tokens // block_size)
    return {"kv_blocks_sent": num_blocks - transfer.held_blocks, "kv_blocks_held": transfer.held_blocks}
