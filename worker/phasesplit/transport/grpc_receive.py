"""The token worker's side of PushKV: header check, verified writes into a KVDestination, completeness.

`PushKVReceiver.add_to_server` serves `TokenWorker.PushKV` on a (sync) gRPC server, taking each
chunk as raw bytes (decoded by `wire` without copying the payload); the worker serves the
service's other method, Generate, itself (`add_token_worker_method`).

Status codes the sender sees: those of `base.STATUS` (layout mismatch, capacity, data loss,
abort), INVALID_ARGUMENT for a malformed chunk, and CANCELLED (no chunk within `timeout`: the
receiver gave up).
The stream commits only on its END message, after every block: a stream that stops without it was
cancelled by the sender, even where the request iterator shows that as a normal end.
Whatever ends a transfer short of commit aborts the destination exactly once.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import NoReturn

import grpc
import numpy as np

from phasesplit.transport import wire
from phasesplit.transport.backends import TIMEOUT
from phasesplit.transport.base import (
    END, KVDestination, KVSink, TransferError, block_bytes, check_header, num_prompt_blocks, status_of,
)
from phasesplit.transport.malloc import tune_malloc
from phasesplit.v1 import worker_pb2 as pb

_KIND_NAMES = ("K", "V")
TOKEN_WORKER = "phasesplit.v1.TokenWorker"
PUSH_KV = f"/{TOKEN_WORKER}/PushKV"


def add_token_worker_method(server: grpc.Server, method: str, handler: grpc.RpcMethodHandler) -> None:
    """Serve one method of TokenWorker (the generated add_TokenWorkerServicer_to_server takes both
    from one servicer; PushKV is the KV receiver's, Generate the worker's)."""
    handlers = {method: handler}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(TOKEN_WORKER, handlers),))
    server.add_registered_method_handlers(TOKEN_WORKER, handlers)


class PushKVReceiver:
    """The grpc backend's receiving side: serves TokenWorker.PushKV into `sink`. `track`: a context
    entered for the length of each call (the worker counts it as a request in flight)."""

    def __init__(self, sink: KVSink, *, timeout: float = TIMEOUT,
                 track: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext, **_unused):
        self.sink = sink
        self.timeout = timeout
        self._track = track
        tune_malloc()  # gRPC hands each ~1 MiB message over in a fresh buffer: keep the heap from page-faulting

    def push_kv(self, request_iterator, context: grpc.ServicerContext) -> pb.PushKVReply:
        return handle_push_kv(request_iterator, context, self.sink, timeout=self.timeout)

    def add_to_server(self, server: grpc.Server) -> None:
        handler = grpc.stream_unary_rpc_method_handler(self._serve, request_deserializer=None,
                                                       response_serializer=pb.PushKVReply.SerializeToString)
        add_token_worker_method(server, "PushKV", handler)

    def _serve(self, request_iterator, context: grpc.ServicerContext) -> pb.PushKVReply:
        with self._track():
            return self.push_kv(request_iterator, context)

    def close(self) -> None:
        pass


def read_header(requests: Iterator, refuse: Callable[[grpc.StatusCode, str], NoReturn]) -> pb.KVHeader:
    """The checked header a PushKV stream's first chunk carries; `refuse(code, message)` (it raises)
    a stream without one."""
    first = next(requests, None)
    try:
        header = None if first is None else wire.decode(first).header
    except wire.WireError as exc:
        refuse(grpc.StatusCode.INVALID_ARGUMENT, f"malformed KVChunk: {exc}")
    if header is None:
        refuse(grpc.StatusCode.INVALID_ARGUMENT, "the first KVChunk of a PushKV stream must carry the header")
    try:
        check_header(header)
    except ValueError as exc:
        refuse(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    return header


def handle_push_kv(request_iterator, context: grpc.ServicerContext, sink: KVSink, *,
                   timeout: float = TIMEOUT) -> pb.PushKVReply:
    """Receive one PushKV stream (raw chunk bytes or parsed KVChunk messages) into `sink`."""
    return _Receiver(context, sink, timeout).run(request_iterator)


class _Receiver:
    def __init__(self, context: grpc.ServicerContext, sink: KVSink, timeout: float):
        self._context = context
        self._sink = sink
        self._timeout = timeout
        self._lock = threading.RLock()
        self._dest: KVDestination | None = None
        self._ended = False
        self._progress = time.monotonic()
        self._finished = threading.Event()
        self._bytes = 0
        self._chunks = 0

    def run(self, requests) -> pb.PushKVReply:
        watchdog = threading.Thread(target=self._watch, name="kv-receive-watchdog", daemon=True)
        watchdog.start()
        self._context.add_callback(self._end)
        try:
            return self._receive(iter(requests))
        except BaseException:
            self._end()
            raise
        finally:
            self._finished.set()
            watchdog.join()

    def _receive(self, requests) -> pb.PushKVReply:
        header = read_header(requests, self._refuse)
        self._begin(header)
        layout = header.layout
        num_blocks = num_prompt_blocks(header)
        received = np.zeros((layout.num_layers, 2, num_blocks), dtype=bool)
        received[:, :, :header.num_cached_blocks] = True  # held here already: a chunk for them is refused
        size = block_bytes(layout)
        complete = False
        for raw in requests:
            chunk = self._decode(raw)
            if chunk.kind == END and chunk.header is None and not chunk.data:
                complete = True
                break
            with self._lock:
                self._check_alive()
                self._apply(chunk, received, size)
                self._progress = time.monotonic()
        with self._lock:
            self._check_alive()
            missing = np.argwhere(~received)
            if len(missing):
                layer, kind, block = missing[0]
                self._refuse(grpc.StatusCode.DATA_LOSS,
                             f"incomplete KV: the stream ended without layer {layer} {_KIND_NAMES[kind]} "
                             f"block {block} ({len(missing)} blocks missing)")
            if not complete:
                self._refuse(grpc.StatusCode.ABORTED, "the stream ended without its END message: the sender "
                                                      "cancelled the transfer")
            try:
                self._dest.commit()
            except TransferError as exc:
                self._refuse(status_of(exc), str(exc))
            self._ended = True
        return pb.PushKVReply(bytes_received=self._bytes, chunks_received=self._chunks)

    def _begin(self, header: pb.KVHeader) -> None:
        try:
            dest = self._sink.begin(header)
        except TransferError as exc:
            self._refuse(status_of(exc), str(exc))
        with self._lock:
            if self._ended:  # the watchdog or a cancellation got here first
                dest.abort()
                self._context.abort(grpc.StatusCode.CANCELLED, "transfer ended while reserving blocks")
            self._dest = dest
            self._progress = time.monotonic()

    def _apply(self, chunk: wire.Chunk, received: np.ndarray, size: int) -> None:
        num_layers, _, num_blocks = received.shape
        start, end = chunk.block_start, chunk.block_start + chunk.block_count
        where = f"layer {chunk.layer} {_KIND_NAMES[chunk.kind] if chunk.kind < 2 else chunk.kind} blocks [{start}, {end})"
        if chunk.header is not None:
            self._refuse(grpc.StatusCode.INVALID_ARGUMENT, "only the first KVChunk may carry a header")
        if chunk.layer >= num_layers:
            self._refuse(grpc.StatusCode.INVALID_ARGUMENT, f"chunk.layer must be < {num_layers}, got {chunk.layer}")
        if chunk.kind > 1:
            self._refuse(grpc.StatusCode.INVALID_ARGUMENT,
                         f"chunk.kind must be 0 (K), 1 (V) or 2 (END, without data), got {chunk.kind}")
        if chunk.block_count < 1 or end > num_blocks:
            self._refuse(grpc.StatusCode.INVALID_ARGUMENT,
                         f"chunk.block_start/block_count: {where} is outside the prompt's {num_blocks} blocks")
        if len(chunk.data) != chunk.block_count * size:
            self._refuse(grpc.StatusCode.INVALID_ARGUMENT,
                         f"chunk.data: {where} holds {len(chunk.data)} bytes, expected {chunk.block_count * size}")
        if received[chunk.layer, chunk.kind, start:end].any():
            self._refuse(grpc.StatusCode.INVALID_ARGUMENT, f"chunk repeats {where}")
        # Written into the reserved blocks first, checked after: a mismatch aborts the transfer, which
        # frees those blocks before anything reads them.
        crcs = []
        try:
            self._dest.receive(chunk.layer, chunk.kind, start, chunk.block_count,
                               lambda views: crcs.append(wire.copy_checked(chunk.data, views)))
        except TransferError as exc:  # e.g. the request was aborted here while its KV was arriving
            self._refuse(status_of(exc), str(exc))
        if crcs != [chunk.checksum]:
            self._refuse(grpc.StatusCode.DATA_LOSS, f"checksum mismatch in {where}")
        received[chunk.layer, chunk.kind, start:end] = True
        self._bytes += len(chunk.data)
        self._chunks += 1

    def _decode(self, raw) -> wire.Chunk:
        try:
            return wire.decode(raw)
        except wire.WireError as exc:
            self._refuse(grpc.StatusCode.INVALID_ARGUMENT, f"malformed KVChunk: {exc}")

    def _check_alive(self) -> None:
        if not self._context.is_active():   # cancelled by the sender, whose callback may still wait for the lock:
            self._end()                     # what it sent before cancelling must not commit
        if self._ended:  # the watchdog or a cancellation ended it; the RPC is already over
            self._context.abort(grpc.StatusCode.CANCELLED, "transfer ended")

    def _refuse(self, code: grpc.StatusCode, message: str):
        self._end()
        self._context.abort(code, message)

    def _end(self) -> None:
        """Abort the destination unless it was committed; idempotent, any thread."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
            dest = self._dest
        if dest is not None:
            dest.abort()

    def _watch(self) -> None:
        poll = min(max(self._timeout / 10, 0.01), 1.0)
        while not self._finished.wait(poll):
            with self._lock:
                stalled = not self._ended and time.monotonic() - self._progress > self._timeout
            if stalled:
                self._end()
                self._context.cancel()
                return
