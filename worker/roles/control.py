"""The `Worker` service every role serves: Info, Load, Abort, Drain."""

from __future__ import annotations

from typing import Callable

import grpc

import phasesplit
from phasesplit.transport.base import layout_to_proto
from phasesplit.roles.core import WorkerCore
from phasesplit.v1 import worker_pb2 as pb
from phasesplit.v1 import worker_pb2_grpc as pb_grpc


class WorkerService(pb_grpc.WorkerServicer):
    def __init__(self, core: WorkerCore, aborts: list[Callable[[str], bool]], pending_transfers: Callable[[], int]):
        self.core = core
        self.aborts = aborts  # each role's own abort (KV senders, received KV); True when it held the request
        self.pending_transfers = pending_transfers

    def Info(self, request, context):
        engine = self.core.engine
        return pb.WorkerInfo(role=self.core.role, model=self.core.settings.served_model_name,
                             layout=layout_to_proto(engine.layout), max_model_len=engine.max_model_len,
                             num_kv_blocks=engine.num_total_blocks, version=phasesplit.__version__)

    def Load(self, request, context):
        stats = self.core.loop.stats
        return pb.WorkerLoad(
            waiting_requests=stats.waiting_requests, waiting_tokens=stats.waiting_tokens,
            running_requests=stats.running_requests, kv_blocks_used=stats.used_blocks,
            kv_blocks_free=stats.free_blocks, pending_transfers=self.pending_transfers(),
            draining=self.core.draining.is_set(), max_running_requests=self.core.engine.config.max_num_seqs)

    def Abort(self, request, context):
        if not request.request_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must be a non-empty string")
        found = False
        for abort in self.aborts:
            found = abort(request.request_id) or found
        found = self.core.loop.abort(request.request_id).result() or found
        return pb.AbortReply(found=found)

    def Drain(self, request, context):
        self.core.drain()
        return pb.DrainReply(in_flight=self.core.inflight + self.pending_transfers())
