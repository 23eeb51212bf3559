"""The `Worker` service every role serves: Info, Load, Abort, TokenizerFiles.

Drain is no RPC: only the worker's own SIGTERM (the pod's termination) drains it. Abort from the
router stops the request wherever it is; from a prompt worker it only frees KV pushed here."""

from __future__ import annotations

from typing import Callable

import grpc

import phasesplit
from phasesplit import auth
from phasesplit.engine.tokenizer import tokenizer_digest
from phasesplit.prefix_hash import HASH_NAME
from phasesplit.roles.core import WorkerCore
from phasesplit.v1 import worker_pb2 as pb
from phasesplit.v1 import worker_pb2_grpc as pb_grpc


FILE_CHUNK_BYTES = 1 << 20


class WorkerService(pb_grpc.WorkerServicer):
    def __init__(self, core: WorkerCore, aborts: list[Callable[[str], bool]], pending_transfers: Callable[[], int],
                 tokenizer_files: dict[str, bytes], kv_aborts: list[Callable[[str], bool]] = ()):
        self.core = core
        self.aborts = aborts  # each role's own abort (KV senders, received KV); True when it held the request
        self.kv_aborts = list(kv_aborts)  # the received KV's only: what a prompt worker may abort
        self.pending_transfers = pending_transfers
        self.tokenizer_files = tokenizer_files
        self.tokenizer_digest = tokenizer_digest(tokenizer_files) if "tokenizer.json" in tokenizer_files else ""

    def Info(self, request, context):
        engine = self.core.engine
        return pb.WorkerInfo(role=self.core.role, model=self.core.settings.served_model_name,
                             layout=engine.layout.to_proto(), max_model_len=engine.max_model_len,
                             num_kv_blocks=engine.num_total_blocks, version=phasesplit.__version__,
                             tokenizer_digest=self.tokenizer_digest,
                             prefix_hash=HASH_NAME if engine.block_manager.prefix_caching else "")

    def Load(self, request, context):
        stats = self.core.loop.stats
        return pb.WorkerLoad(
            waiting_requests=stats.waiting_requests, waiting_tokens=stats.waiting_tokens,
            running_requests=stats.running_requests, kv_blocks_used=stats.used_blocks,
            kv_blocks_free=stats.free_blocks, pending_transfers=self.pending_transfers(),
            draining=self.core.draining.is_set(), max_running_requests=self.core.engine.config.max_num_seqs,
            streams_ended=self.core.streams_ended(), prefix_cache=self._prefix_cache(request))

    def _prefix_cache(self, request: pb.LoadRequest) -> pb.PrefixCacheSummary | None:
        blocks = self.core.engine.block_manager
        if not blocks.prefix_caching:
            return None
        summary = blocks.events.since(request.cache_epoch, request.cache_sequence)
        return pb.PrefixCacheSummary(epoch=summary.epoch, sequence=summary.sequence, full=summary.full,
                                     stored=summary.stored, removed=summary.removed)

    def Abort(self, request, context):
        if not request.request_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must be a non-empty string")
        caller = auth.current_caller()
        if caller is not None and caller.role == auth.PROMPT_WORKER:
            return pb.AbortReply(found=any([abort(request.request_id) for abort in self.kv_aborts]))
        found = False
        for abort in self.aborts:
            found = abort(request.request_id) or found
        found = self.core.loop.abort(request.request_id).result() or found
        return pb.AbortReply(found=found)

    def TokenizerFiles(self, request, context):
        if not self.tokenizer_digest:
            context.abort(grpc.StatusCode.NOT_FOUND, "the model directory has no tokenizer.json")
        for name, data in self.tokenizer_files.items():
            for start in range(0, max(len(data), 1), FILE_CHUNK_BYTES):
                yield pb.FileChunk(name=name, data=data[start:start + FILE_CHUNK_BYTES])
