"""`TokenWorker.Generate`: decodes from the KV pushed into the paged cache (PushKV: the transport's
grpc receiver), or, on a mixed worker, runs both phases for a request that brings its prompt."""

from __future__ import annotations

import logging

import grpc

from phasesplit.logs import request_id_from_metadata
from phasesplit.roles.convert import sampling_from_proto
from phasesplit.roles.core import WorkerCore
from phasesplit.roles.kv_inbox import FAILED, KVInbox
from phasesplit.roles.streaming import stream_tokens
from phasesplit.transport.grpc_receive import add_token_worker_method
from phasesplit.v1 import worker_pb2 as pb
from phasesplit.v1 import worker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


def add_generate_to_server(service, server: grpc.Server) -> None:
    """TokenWorker.Generate of `service`; PushKV is the KV receiver's (`PushKVReceiver.add_to_server`)."""
    add_token_worker_method(server, "Generate", grpc.unary_stream_rpc_method_handler(
        service.Generate, request_deserializer=pb.GenerateRequest.FromString,
        response_serializer=pb.TokenEvent.SerializeToString))


class TokenService(pb_grpc.TokenWorkerServicer):
    def __init__(self, core: WorkerCore, inbox: KVInbox):
        self.core = core
        self.inbox = inbox

    def Generate(self, request, context):
        with self.core.tracked():
            if not request.request_id:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must be a non-empty string")
            try:
                params = sampling_from_proto(request.sampling)
            except ValueError as exc:
                self.inbox.abort(request.request_id)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sampling.{exc}")
            phases = "prefill and decode" if request.prompt_token_ids else "decode from the prompt worker's KV"
            log.info("request %s: %s", request.request_id, phases,
                     extra={"request_id": request_id_from_metadata(context, request.request_id)})
            if request.prompt_token_ids:
                yield from self._both_phases(request, params, context)
            else:
                yield from self._from_received_kv(request, params, context)

    def _both_phases(self, request, params, context):
        """A mixed worker's requests; on a token worker, one whose prompt its prefix cache holds all but a
        short tail of (the router's conditional disaggregation)."""
        self.core.refuse_if_draining(context)
        rid, ids, engine = request.request_id, list(request.prompt_token_ids), self.core.engine
        yield from stream_tokens(self.core, context, rid, lambda: engine.add_request(rid, ids, params))

    def _from_received_kv(self, request, params, context):
        rid, engine = request.request_id, self.core.engine
        timeout = self.core.settings.kv_transfer_timeout
        entry = self.inbox.wait(rid, timeout)
        if entry is None:
            self.inbox.abort(rid)
            context.abort(grpc.StatusCode.NOT_FOUND, f"request_id: no KV for {rid!r} arrived within {timeout:g} s")
        if entry.state == FAILED:
            context.abort(grpc.StatusCode.ABORTED, f"request {rid}: KV transfer failed: {entry.error}")
        handoff = entry.kv.with_first_token(request.first_token if request.HasField("first_token") else None)
        if handoff.first_token is None:
            self.inbox.abort(rid)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "first_token: required (the prompt worker's first token) when the KV header lacks it")
        if not entry.claim():
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"request {rid}: KV is {entry.state}: {entry.error}")
        if not self.inbox.claim_shards(rid):
            self.core.loop.run(engine.release, rid)
            context.abort(grpc.StatusCode.ABORTED, f"request {rid}: KV transfer failed: the KV shard of a "
                                                   "tensor-parallel rank did not arrive")

        def add():
            try:
                engine.add_prefilled(handoff, params)
            except BaseException:
                engine.release(rid)
                raise

        yield from stream_tokens(self.core, context, rid, add)
