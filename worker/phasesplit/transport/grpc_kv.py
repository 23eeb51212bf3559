"""KV over gRPC: `TokenWorker.PushKV`, a client stream of ~1 MiB KVChunks (sending side here,
receiving side in `grpc_receive`).

Synchronous gRPC throughout: the prompt worker's engine thread calls `send_layer`, which only
queues the layer; gRPC's request thread reads the blocks, checksums them and encodes each chunk
(one copy, see `wire`) as the stream takes it. The queue is bounded in chunks: a slow token
worker blocks `send_layer` (backpressure), never memory.

The stream starts with the first layer queued, not when the transfer is opened: a request that waits
in the prompt worker's queue holds no blocks and no stream on the token worker meanwhile (which
would free a reservation that gets no data within its timeout).
"""

from __future__ import annotations

import collections
import math
import threading
import time
from dataclasses import dataclass

import grpc
import torch

from phasesplit.transport import wire
from phasesplit.transport.backends import TIMEOUT
from phasesplit.transport.base import (
    K, V, KVDataLoss, LayerShape, Progress, TransferAborted, TransferError, TransferResult, TransferTimeout,
    block_bytes, check_header, error_from_status,
)
from phasesplit.transport.blocks import read_pieces, to_host
from phasesplit.transport.channels import MAX_MESSAGE_BYTES, Channels
from phasesplit.transport.grpc_receive import PUSH_KV
from phasesplit.transport.malloc import tune_malloc
from phasesplit.v1 import worker_pb2 as pb

DEFAULT_CHUNK_BYTES = 1 << 20
DEFAULT_MAX_QUEUED_CHUNKS = 256


@dataclass(slots=True)
class _Layer:
    layer: int
    k: torch.Tensor
    v: torch.Tensor
    ids: list[int]
    first: int  # the position of ids[0] in the sequence's blocks
    ready: object | None  # accelerator event recorded after the layer was written


class GrpcKVSender:
    """One PushKV stream; made by GrpcKVTransport.open()."""

    def __init__(self, channel: grpc.Channel, header: pb.KVHeader, *, chunk_bytes: int,
                 max_queued_chunks: int, timeout: float):
        check_header(header)
        self._header = pb.KVHeader()
        self._header.CopyFrom(header)
        self._shape = LayerShape.of(header)
        self._num_layers = self._shape.num_layers
        self._per_chunk = max(1, chunk_bytes // block_bytes(header.layout))
        self._max_queued = max_queued_chunks
        self._timeout = timeout

        self._cond = threading.Condition()
        self._pending: collections.deque[_Layer] = collections.deque()
        self._queued = 0           # chunks of queued layers not yet handed to gRPC
        self._queued_blocks = Progress(self._shape)
        self._closing = False      # finish() called: end the stream once the queue drains
        self._error: TransferError | None = None
        self._bytes_sent = 0
        self._progress = time.monotonic()
        self._started = time.perf_counter()
        self._done = threading.Event()
        self._push_kv = channel.stream_unary(PUSH_KV, request_serializer=None,
                                             response_deserializer=pb.PushKVReply.FromString)
        self._call: grpc.Future | None = None

    def _start(self) -> None:
        """The PushKV stream, once (called with `_cond` held)."""
        if self._call is None:
            self._call = self._push_kv.future(self._requests())
            self._call.add_done_callback(self._on_done)

    @property
    def error(self) -> TransferError | None:
        """Why the transfer failed, as soon as it is known (finish() raises it)."""
        return self._error

    @property
    def queued_chunks(self) -> int:
        return self._queued

    def send_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                   block_ids: list[int] | None = None, first: int = 0) -> None:
        ids = self._shape.check(layer, k, v, block_ids, self._queued_blocks.sent, first=first)
        ready = None
        if k.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        item = _Layer(layer, k, v, ids, first, ready)
        chunks = 2 * math.ceil(len(ids) / self._per_chunk)
        with self._cond:
            self._queued_blocks.add(layer, len(ids))
            deadline = time.monotonic() + self._timeout
            while self._error is None and self._queued and self._queued + chunks > self._max_queued:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            else:
                if self._error is None:
                    self._pending.append(item)
                    self._queued += chunks
                    self._progress = time.monotonic()
                    self._start()
                    self._cond.notify_all()
                return
        self._fail(TransferTimeout(f"send_layer: the token worker took no chunk for {self._timeout:g}s"))

    def finish(self) -> TransferResult:
        with self._cond:
            missing = self._queued_blocks.missing()
            self._closing = True
            if not missing and self._error is None:
                self._start()   # none queued: the stream still carries the header and its end
            self._cond.notify_all()
        if missing:
            self._fail(KVDataLoss(f"finish() before every block was sent of layers {missing}"))
        self._wait_done()
        if self._error is not None:
            raise self._error
        reply = self._call.result()
        return TransferResult(bytes=reply.bytes_received, seconds=time.perf_counter() - self._started)

    def abort(self) -> None:
        self._fail(TransferAborted("transfer aborted by the prompt worker"))
        self._done.wait(self._timeout)

    def _requests(self):
        yield wire.encode_header(self._header)
        while (item := self._next_layer()) is not None:
            try:
                chunks = list(self._plan(item))
                for kind, host, ids, start, count in chunks:
                    data = wire.encode_data(item.layer, kind, item.first + start, count,
                                            read_pieces(host, ids, start, count))
                    if self._error is not None:
                        break
                    yield data
                    with self._cond:
                        self._queued -= 1
                        self._bytes_sent += len(data)
                        self._progress = time.monotonic()
                        self._cond.notify_all()
            except Exception as exc:  # reading the source tensors failed: end the stream
                self._fail(TransferError(f"reading layer {item.layer} failed: {exc}"))
        if self._error is None:
            yield wire.encode_end()
        self._end_without_closing()

    def _plan(self, item: _Layer):
        for kind, cache in ((K, item.k), (V, item.v)):
            host, ids = to_host(cache, item.ids, item.ready)
            for start in range(0, len(item.ids), self._per_chunk):
                yield kind, host, ids, start, min(self._per_chunk, len(item.ids) - start)

    def _end_without_closing(self) -> None:
        """Returning from the request iterator half-closes the stream. A failed or aborted transfer
        ends by cancellation instead (the receiver then frees what it holds): wait until the call is
        over before returning."""
        if self._error is not None:
            self._done.wait(self._timeout)

    def _next_layer(self) -> _Layer | None:
        with self._cond:
            while not self._pending and not self._closing and self._error is None:
                self._cond.wait()
            if self._error is not None or not self._pending:
                return None
            return self._pending.popleft()

    def _fail(self, error: TransferError) -> None:
        with self._cond:
            if self._error is None:
                self._error = error
            self._pending.clear()
            self._cond.notify_all()
            call = self._call
        if call is None:   # never started: the token worker has nothing of this transfer
            self._done.set()
        else:
            call.cancel()

    def _on_done(self, call) -> None:
        code = call.code()
        if code != grpc.StatusCode.OK:
            with self._cond:
                if self._error is None:
                    self._error = error_from_status(code, call.details() or "")
                self._pending.clear()
                self._cond.notify_all()
        self._done.set()

    def _wait_done(self) -> None:
        while not self._done.wait(min(0.1, self._timeout)):
            with self._cond:
                stalled = time.monotonic() - self._progress > self._timeout
            if stalled:
                self._fail(TransferTimeout(f"no progress for {self._timeout:g}s: the token worker stalled"))
                self._done.wait(self._timeout)
                return


class GrpcKVTransport:
    """Opens PushKV streams; keeps one channel per token worker address until close()."""

    name = "grpc"

    def __init__(self, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 max_queued_chunks: int = DEFAULT_MAX_QUEUED_CHUNKS, timeout: float = TIMEOUT):
        if not 4096 <= chunk_bytes <= MAX_MESSAGE_BYTES // 2:
            raise ValueError(f"chunk_bytes must be in [4096, {MAX_MESSAGE_BYTES // 2}], got {chunk_bytes}")
        if max_queued_chunks < 1:
            raise ValueError(f"max_queued_chunks must be >= 1, got {max_queued_chunks}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self._options = dict(chunk_bytes=chunk_bytes, max_queued_chunks=max_queued_chunks, timeout=timeout)
        self._channels = Channels()
        tune_malloc()  # before the first message buffer: fresh ~1 MiB buffers would page-fault each time

    def open(self, addr: str, header: pb.KVHeader) -> GrpcKVSender:
        return GrpcKVSender(self._channels.get(addr), header, **self._options)

    def close(self) -> None:
        self._channels.close()

    def __enter__(self) -> GrpcKVTransport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
