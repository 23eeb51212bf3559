"""KV over a process group (`--kv-backend nccl`): gRPC for control, send/recv for the tensors.

Per token worker address the prompt worker keeps one `_Pair`: a 2-rank group (NCCL for CUDA
caches, gloo for CPU caches; see `kv_group`) made on first use through `KVGroup.Connect`, reused
by every transfer to that worker, and discarded as soon as a send fails or times out (the next
transfer makes a new one). A transfer is one `KVGroup.Push` call: the token worker reserves
blocks and answers `accepted`, the pair's thread sends each queued layer (K and V of the
sequence's blocks in one frame), the token worker answers `committed` once every layer arrived.

`send_layer` only queues references to the cache (the engine thread never waits on the
network); the pair's thread gathers the blocks when it sends them, so the transfer of layer i
overlaps the prefill of layers i+1... The token worker's side is `nccl_receive`.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
import uuid

import grpc
import torch

from phasesplit.transport import kv_group
from phasesplit.transport.base import (
    DTYPES, KVDataLoss, LayerShape, TransferAborted, TransferError, TransferResult, TransferTimeout, check_header,
    error_from_status, layout_to_proto,
)
from phasesplit.transport.channels import Channels
from phasesplit.v1 import worker_pb2 as pb
from phasesplit.v1 import worker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_QUEUED_LAYERS = 4096
MAX_FRAMES_IN_FLIGHT = 4  # layers sent and not yet received, per pair


class NcclKVSender:
    """One request's transfer over a pair's group; made by NcclKVTransport.open()."""

    def __init__(self, pair: _Pair | None, header: pb.KVHeader, timeout: float, error: TransferError | None = None):
        self._pair = pair
        self._header = header
        self._timeout = timeout
        self.transfer_id = next(_transfer_ids)
        self._shape = LayerShape.of(header)
        self.num_layers = self._shape.num_layers
        self.num_blocks = self._shape.num_blocks
        self._cond = threading.Condition()
        self._layers_seen: set[int] = set()
        self._accepted = False
        self._layers_sent = 0
        self._bytes = 0
        self._committed = False
        self._ended = False           # the Push call ended (committed or failed)
        self._released = threading.Event()  # the pair's thread will read none of our blocks again
        self._error = error
        self._started = time.perf_counter()
        self._call = None
        if error is not None or pair is None:
            self._ended = True
            self._released.set()
            return
        self._call = pair.stub.Push(pb.KVGroupPush(group_id=pair.group_id, transfer_id=self.transfer_id,
                                                   header=header), wait_for_ready=False)
        threading.Thread(target=self._watch_call, name=f"kv-push-{self.transfer_id}", daemon=True).start()

    @property
    def error(self) -> TransferError | None:
        return self._error

    # ---- KVSender ----

    def send_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor, block_ids: list[int] | None = None) -> None:
        ids = self._shape.check(layer, k, v, block_ids, self._layers_seen,
                                None if self._pair is None else self._pair.device)
        with self._cond:
            self._layers_seen.add(layer)
            if self._error is not None:
                return
        ready = None
        if k.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        self._pair.submit(("layer", self, layer, k, v, ids, ready), self._timeout)

    def finish(self) -> TransferResult:
        missing = sorted(set(range(self.num_layers)) - self._layers_seen)
        if missing:
            self.fail(KVDataLoss(f"finish() before send_layer() for layers {missing}"))
        with self._cond:
            if not self._cond.wait_for(lambda: self._ended or self._error is not None, self._finish_wait()):
                self._error = self._error or TransferTimeout(
                    f"the token worker did not acknowledge the KV within {self._timeout:g} s")
        if self._error is not None:
            self.abort()
            raise self._error
        return TransferResult(bytes=self._bytes, seconds=time.perf_counter() - self._started)

    def abort(self) -> None:
        self.fail(TransferAborted("transfer aborted by the prompt worker"))
        if self._pair is not None and not self._released.is_set():
            self._pair.submit(("abort", self), self._timeout)
        self._released.wait(self._timeout)

    # ---- used by the pair's thread and the call watcher ----

    def fail(self, error: TransferError) -> None:
        with self._cond:
            if self._error is None and not self._committed:
                self._error = error
            self._cond.notify_all()
        if self._call is not None:
            self._call.cancel()

    def wait_accepted(self) -> bool:
        """True once the token worker reserved the blocks; False when the transfer failed first."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self._accepted or self._error is not None or self._ended, self._timeout)
            if not ok:
                self._error = TransferTimeout(f"the token worker did not accept the KV within {self._timeout:g} s")
            return self._accepted and self._error is None

    def wants_data(self) -> bool:
        with self._cond:
            return self._error is None

    def layer_sent(self) -> bool:
        """Counts a sent layer; True when it was the last one."""
        with self._cond:
            self._layers_sent += 1
            self._cond.notify_all()
            return self._layers_sent == self.num_layers

    def owes_abort_frame(self) -> bool:
        """Accepted by the token worker, which still expects layers that will not come."""
        with self._cond:
            return self._accepted and self._layers_sent < self.num_layers

    def release(self) -> None:
        self._released.set()

    # ---- helpers ----

    def _finish_wait(self) -> float:
        return self._timeout * 2  # the pair's queue, then the token worker's commit

    def _watch_call(self) -> None:
        try:
            for event in self._call:
                with self._cond:
                    if event.accepted:
                        self._accepted = True
                    if event.committed:
                        self._committed = True
                        self._bytes = event.bytes_received
                    self._cond.notify_all()
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):  # the peer restarted or is gone
                self._pair.broken(kv_group.GroupBroken(f"token worker {self._pair.addr}: {details}"))
            with self._cond:
                if self._error is None:
                    self._error = error_from_status(code, details)
        finally:
            with self._cond:
                self._ended = True
                if self._error is None and not self._committed:
                    self._error = KVDataLoss("the token worker ended the transfer without committing it")
                self._cond.notify_all()


_transfer_ids = itertools.count(1)


class _Pair:
    """This prompt worker's side of the group with one token worker, and the thread that sends over it."""

    def __init__(self, addr: str, channel: grpc.Channel, layout: pb.KVLayout, device: torch.device,
                 timeout: float, max_queued: int):
        self.addr = addr
        self.device = device
        self.backend = self.link_backend(device)
        self.group_id = uuid.uuid4().hex
        self.stub = pb_grpc.KVGroupStub(channel)
        self.timeout = timeout
        self._max_queued = max_queued
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._error: kv_group.GroupBroken | None = None
        self._live: set[NcclKVSender] = set()
        self._in_flight: collections.deque = collections.deque()  # (sender, works, tensors they read, what)
        self._frames = 0
        self._buffers = kv_group.Buffers(MAX_FRAMES_IN_FLIGHT, DTYPES[layout.dtype], device)
        host = addr.rsplit(":", 1)[0].strip("[]")
        if host.startswith("dns:"):
            host = host[4:]
        self.layout = layout
        self.group = self._join(host, self._endpoint(host, layout))
        self._thread = threading.Thread(target=self._run, name=f"kv-pair-{addr}", daemon=True)
        self._thread.start()

    @property
    def error(self) -> kv_group.GroupBroken | None:
        return self._error

    def submit(self, item: tuple, timeout: float) -> None:
        sender = item[1] if len(item) > 1 else None
        with self._cond:
            if self._error is not None:
                if sender is not None:
                    sender.fail(self._error)
                    sender.release()
                return
            if not self._cond.wait_for(lambda: len(self._queue) < self._max_queued or self._error is not None,
                                       timeout):
                self._error = kv_group.GroupBroken(f"KV queue to {self.addr} made no progress for {timeout:g} s")
            if self._error is None:
                if sender is not None:
                    self._live.add(sender)
                self._queue.append(item)
                self._cond.notify_all()
                return
        self._fail_all()

    def broken(self, error: kv_group.GroupBroken) -> None:
        with self._cond:
            if self._error is None:
                self._error = error
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            if self._error is None:
                self._queue.append(("close",))
                self._cond.notify_all()
        self._thread.join(self.timeout)

    @staticmethod
    def link_backend(device: torch.device) -> str:
        return kv_group.backend_for(device)

    def _endpoint(self, host: str, layout: pb.KVLayout) -> pb.KVGroupEndpoint:
        """The token worker's side of the pair (KVGroup.Connect: backend and layout checked there)."""
        request = pb.KVGroupConnect(group_id=self.group_id, backend=self.backend, layout=layout, host=host)
        try:
            return self.stub.Connect(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise error_from_status(exc.code(), exc.details() or "") from exc

    def _join(self, host: str, endpoint: pb.KVGroupEndpoint):
        """This side of the data path: a process group with the token worker."""
        store = kv_group.connect_store(host, endpoint.store_port, self.timeout)
        bind = kv_group.local_address_towards(host)
        return kv_group.make_group(self.backend, store, self.group_id, kv_group.PROMPT_RANK, bind, self.timeout)

    def _next(self, block: bool) -> tuple | None:
        """The next queued item; ("idle",) when there is none and `block` is False; None once broken."""
        with self._cond:
            if block:
                self._cond.wait_for(lambda: self._queue or self._error is not None)
            if self._error is not None:
                return None
            if not self._queue:
                return ("idle",)
            item = self._queue.popleft()
            self._cond.notify_all()
            return item

    def _run(self) -> None:
        try:
            while (item := self._next(block=not self._in_flight)) is not None:
                if item[0] == "idle":
                    self._retire(len(self._in_flight) - 1)
                elif item[0] == "close":
                    self._retire(0)
                    self._send_frame(0, 0, 0, kv_group.CLOSE)
                    with self._cond:
                        self._error = kv_group.GroupBroken("the KV transport was closed")
                    break
                elif item[0] == "abort":
                    self._retire(0)
                    self._abort(item[1])
                else:
                    self._send_layer(*item[1:])
        except kv_group.GroupBroken as exc:
            log.warning("KV group with %s broken, discarding it: %s", self.addr, exc)
            self.broken(exc)
        self._fail_all()
        self._discard()
        self._in_flight.clear()

    def _discard(self) -> None:
        kv_group.discard(self.group)

    def _send_layer(self, sender: NcclKVSender, layer: int, k, v, ids: list[int], ready) -> None:
        if not sender.wants_data() or not sender.wait_accepted():
            return
        if ready is not None:
            torch.cuda.current_stream(k.device).wait_event(ready)
        self._retire(MAX_FRAMES_IN_FLIGHT - 1)
        first = kv_group.one_run(ids)
        if first is not None and k.is_contiguous() and v.is_contiguous():
            parts = (k[first:first + len(ids)], v[first:first + len(ids)])  # straight from the cache
        else:
            frame = self._buffers.get(self._frames % MAX_FRAMES_IN_FLIGHT, (2, len(ids), *k.shape[1:]))
            kv_group.gather(frame[0], k, ids)
            kv_group.gather(frame[1], v, ids)
            parts = (frame[0], frame[1])
        self._frames += 1
        what = f"sending layer {layer} to {self.addr}"
        meta = kv_group.meta(sender.transfer_id, layer, len(ids), kv_group.DATA, self.device)
        works = [kv_group.isend(self.group, t, kv_group.TOKEN_RANK, what) for t in (meta, *parts)]
        self._in_flight.append((sender, works, (meta, *parts), what))

    def _retire(self, keep: int) -> None:
        """Wait for the oldest frames in flight until at most `keep` remain; counts their layers as sent."""
        cuda = self.device.type == "cuda"
        while len(self._in_flight) > max(keep, 0):
            sender, works, _tensors, what = self._in_flight.popleft()
            for work in works:
                kv_group.wait(work, self.timeout, what, cuda=cuda)
            if sender.layer_sent():
                self._forget(sender)

    def _abort(self, sender: NcclKVSender) -> None:
        try:
            if sender.owes_abort_frame():
                self._send_frame(sender.transfer_id, 0, 0, kv_group.ABORT)
        finally:
            self._forget(sender)

    def _send_frame(self, transfer_id: int, layer: int, num_blocks: int, op: int) -> None:
        meta = kv_group.meta(transfer_id, layer, num_blocks, op, self.device)
        kv_group.send(self.group, meta, kv_group.TOKEN_RANK, self.timeout, f"sending a frame to {self.addr}")

    def _forget(self, sender: NcclKVSender) -> None:
        with self._cond:
            self._live.discard(sender)
        sender.release()

    def _fail_all(self) -> None:
        with self._cond:
            senders, self._live = list(self._live), set()
            error = self._error
            self._queue.clear()
        for sender in senders:
            sender.fail(error)
            sender.release()


class NcclKVTransport:
    """Sends KV to token workers over per-pair process groups; one group per token worker address."""

    name = "nccl"
    pair_class = _Pair

    def __init__(self, *, device: str | torch.device = "cpu", timeout: float = DEFAULT_TIMEOUT,
                 max_queued_layers: int = DEFAULT_MAX_QUEUED_LAYERS):
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if max_queued_layers < 1:
            raise ValueError(f"max_queued_layers must be >= 1, got {max_queued_layers}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.backend = self.pair_class.link_backend(self.device)
        self._timeout = timeout
        self._max_queued = max_queued_layers
        self._channels = Channels()
        self._pairs: dict[str, _Pair] = {}
        self._locks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)
        self._lock = threading.Lock()

    def open(self, addr: str, header: pb.KVHeader) -> NcclKVSender:
        check_header(header)
        try:
            pair = self._pair(addr, header.layout)
        except TransferError as exc:
            return NcclKVSender(None, header, self._timeout, error=exc)
        return NcclKVSender(pair, header, self._timeout)

    def close(self) -> None:
        with self._lock:
            pairs, self._pairs = list(self._pairs.values()), {}
        for pair in pairs:
            pair.close()
        self._channels.close()

    def __enter__(self) -> NcclKVTransport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _pair(self, addr: str, layout: pb.KVLayout) -> _Pair:
        with self._lock:
            addr_lock = self._locks[addr]
        with addr_lock:  # one rendezvous at a time per token worker
            with self._lock:
                pair = self._pairs.get(addr)
                if pair is not None and pair.error is None and pair.layout == layout:
                    return pair
            if pair is not None:
                pair.close()
            pair = self.pair_class(addr, self._channels.get(addr), layout_to_proto(layout), self.device, self._timeout, self._max_queued)
            with self._lock:
                self._pairs[addr] = pair
            return pair
