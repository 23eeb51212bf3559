"""The KV handoff between simulated workers: the real PushKV stream with the real header, and no data.

The prompt side opens `TokenWorker.PushKV` with the request's `KVHeader` when its first layer is
computed, as the real senders do (the token side checks the layout and reserves the prompt's blocks in
its engine, as for real KV), waits the modelled
transfer time (`perf.kv_transfer_time`: the link of its hardware, layer-wise overlap with the
prefill), then ends the stream; the token side commits the reserved blocks on that END and
Generate claims them. Refusals, aborts and cancellations take the real paths and status codes."""

from __future__ import annotations

import threading
import time

import grpc

from phasesplit.fleet.perf import kv_transfer_time
from phasesplit.transport import wire
from phasesplit.transport.backends import TIMEOUT
from phasesplit.transport.base import (END, TransferAborted, TransferError, TransferResult, TransferTimeout,
                                       error_from_status, status_of)
from phasesplit.transport.channels import Channels
from phasesplit.transport.grpc_receive import PUSH_KV, PushKVReceiver, read_header
from phasesplit.v1 import worker_pb2 as pb


class SimHandoff:
    """The sending side (a `KVTransport`) of a prompt worker whose engine is a `SimEngine`."""
    name = "sim"

    def __init__(self, engine, timeout: float = TIMEOUT):
        self.engine = engine
        self.timeout = timeout
        self._channels = Channels()

    def open(self, addr: str, header: pb.KVHeader) -> SimSender:
        return SimSender(self, self._channels.get(addr), header)

    def transfer_seconds(self, num_tokens: int, prefill_s: float) -> float:
        """Modelled seconds the handoff adds after the prefill ends (prefill_s: the batch's modelled time)."""
        perf, engine = self.engine.perf, self.engine
        return kv_transfer_time(num_tokens, prefill_s, perf.kv_bytes_per_token, perf.link_bytes_per_s,
                                engine.layout.num_layers, engine.layerwise)

    def close(self) -> None:
        self._channels.close()


class SimSender:
    def __init__(self, handoff: SimHandoff, channel: grpc.Channel, header: pb.KVHeader):
        self.handoff = handoff
        self.request_id = header.request_id
        self.num_tokens = len(header.prompt_token_ids)
        self._opened = time.perf_counter()
        self._end = threading.Event()
        self._aborted = False
        self._header = header
        self._push_kv = channel.stream_unary(PUSH_KV, request_serializer=None,
                                             response_deserializer=pb.PushKVReply.FromString)
        self._call: grpc.Future | None = None
        self._lock = threading.Lock()

    def _start(self) -> grpc.Future:
        with self._lock:
            if self._call is None:
                self._call = self._push_kv.future(self._requests(self._header))
            return self._call

    def _requests(self, header: pb.KVHeader):
        yield wire.encode_header(header)
        self._end.wait()
        if not self._aborted:
            yield wire.encode_end()

    def send_layer(self, layer, k, v, block_ids=None, first=0) -> None:
        """Nothing to queue (the engine's layer hook marks the prefill's progress itself); the first opens
        the stream."""
        self._start()

    def finish(self) -> TransferResult:
        call, engine = self._start(), self.handoff.engine
        ended, prefill_s = engine.prefilled.get(self.request_id, (time.perf_counter(), 0.0))
        wait = self.handoff.transfer_seconds(self.num_tokens, prefill_s) * engine.time_scale
        left = ended + wait - time.perf_counter()
        if left > 0:
            try:  # the token side may refuse (capacity, layout, abort) while the modelled bytes move
                call.exception(timeout=left)
            except grpc.FutureTimeoutError:
                pass
        self._end.set()
        try:
            call.result(timeout=self.handoff.timeout)
        except grpc.FutureTimeoutError:
            self.abort()
            raise TransferTimeout(f"the token worker did not acknowledge within {self.handoff.timeout:g}s") from None
        except grpc.FutureCancelledError:
            raise TransferAborted("transfer aborted by the prompt worker") from None
        except grpc.RpcError as exc:
            raise error_from_status(exc.code(), exc.details() or "") from None
        return TransferResult(bytes=engine.kv_bytes(self.num_tokens), seconds=time.perf_counter() - self._opened)

    def abort(self) -> None:
        self._aborted = True
        self._end.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()


def receive(request_iterator, context: grpc.ServicerContext, sink, *, timeout: float = TIMEOUT) -> pb.PushKVReply:
    """The token side of a simulated handoff (the `receive` of `TokenService`): a header, then END."""
    header = read_header(iter(request_iterator), context.abort)
    try:
        dest = sink.begin(header)
    except TransferError as exc:
        context.abort(status_of(exc), str(exc))
    committed = threading.Event()
    if not context.add_callback(lambda: committed.is_set() or dest.abort()):
        dest.abort()
    for raw in request_iterator:
        chunk = _decode(raw, context)
        if chunk.kind != END or chunk.header is not None or chunk.data:
            dest.abort()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "a simulated worker takes no KV data: the handoff is a header and an END message")
        try:
            dest.commit()
        except TransferError as exc:
            context.abort(status_of(exc), str(exc))
        committed.set()
        return pb.PushKVReply()
    dest.abort()
    context.abort(grpc.StatusCode.ABORTED, "the stream ended without its END message: the sender cancelled it")


def _decode(raw, context) -> wire.Chunk:
    try:
        return wire.decode(raw)
    except wire.WireError as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed KVChunk: {exc}")


class SimReceiver(PushKVReceiver):
    """The token side's `KVReceiver` for simulated workers: PushKV takes a header and an END."""

    def push_kv(self, request_iterator, context: grpc.ServicerContext) -> pb.PushKVReply:
        return receive(request_iterator, context, self.sink, timeout=self.timeout)
