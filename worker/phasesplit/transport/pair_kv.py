"""The sending side shared by the per-pair backends (nccl, tcp): gRPC for control, a pooled link for the bytes.

Per token worker address the prompt worker keeps one `Pair`: a data link (see `pair_link`: a
process group in `nccl_kv`, a TCP connection in `tcp_kv`) made on first use through
`KVGroup.Connect`, reused by every transfer to that worker, and discarded as soon as a send
fails or times out (the next transfer makes a new one). A transfer is one `KVGroup.Push` call: the token worker reserves
blocks and answers `accepted`, the pair's thread sends each queued layer (K and V of the
sequence's blocks in one frame), the token worker answers `committed` once every layer arrived.

`send_layer` only queues references to the cache (the engine thread never waits on the
network); the pair's thread reads the blocks when it sends them, so the transfer of layer i
overlaps the prefill of layers i+1... The token worker's side is `pair_receive`.

The pair is made when the transfer is opened, the Push call only with the first layer queued: a
request that waits in the prompt worker's queue holds no blocks on the token worker meanwhile
(which would free a reservation that gets no data within its timeout).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass

import grpc
import torch

from phasesplit.transport import kv_group
from phasesplit.transport.backends import TIMEOUT
from phasesplit.transport.base import (
    KVDataLoss, LayerShape, Progress, TransferAborted, TransferError, TransferResult, TransferTimeout, check_header,
    error_from_status,
)
from phasesplit.transport.channels import Channels
from phasesplit.transport.layout import KVLayout
from phasesplit.transport.pair_link import LayerItem, LinkKind, Peer
from phasesplit.v1 import worker_pb2 as pb
from phasesplit.v1 import worker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUED_LAYERS = 4096


# ---- what the engine thread queues for the pair's thread (and LayerItem) ----

@dataclass(slots=True)
class AbortItem:
    """Stop a transfer: the token worker frees its blocks."""

    sender: PairKVSender


@dataclass(slots=True)
class CloseItem:
    """Close the pair: the token worker ends its side."""


@dataclass(slots=True)
class IdleItem:
    """Nothing queued: a moment to complete a frame still in flight."""


QueueItem = LayerItem | AbortItem | CloseItem


# ---- one transfer ----

class PairKVSender:
    """One request's transfer over a pair; made by PairKVTransport.open()."""

    def __init__(self, pair: Pair | None, header: pb.KVHeader, timeout: float, error: TransferError | None = None):
        self._pair = pair
        self._timeout = timeout
        self.transfer_id = next(_transfer_ids)
        self._shape = LayerShape.of(header)
        self.num_layers = self._shape.num_layers
        self._cond = threading.Condition()
        self._queued_blocks = Progress(self._shape)
        self._accepted = False
        self._blocks_sent = 0  # of every layer together
        self._bytes = 0
        self._committed = False
        self._ended = False           # the Push call ended (committed or failed)
        self._released = threading.Event()  # the pair's thread will read none of our blocks again
        self._error = error
        self._started = time.perf_counter()
        self._header = header
        self._call = None
        if error is not None or pair is None:
            self._ended = True
            self._released.set()

    def _start(self) -> None:
        """The Push call, once (called with `_cond` held)."""
        if self._call is None and self._error is None:
            push = pb.KVGroupPush(group_id=self._pair.group_id, transfer_id=self.transfer_id, header=self._header)
            self._call = self._pair.stub.Push(push, wait_for_ready=False)
            threading.Thread(target=self._watch_call, name=f"kv-push-{self.transfer_id}", daemon=True).start()

    @property
    def error(self) -> TransferError | None:
        return self._error

    # ---- KVSender ----

    def send_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor, block_ids: list[int] | None = None,
                   first: int = 0) -> None:
        ids = self._shape.check(layer, k, v, block_ids, self._queued_blocks.sent,
                                None if self._pair is None else self._pair.device, first)
        with self._cond:
            self._queued_blocks.add(layer, len(ids))
            if self._error is not None:
                return
            self._start()
        ready = None
        if k.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        self._pair.submit(LayerItem(self, layer, k, v, ids, first, ready), self._timeout)

    def finish(self) -> TransferResult:
        missing = self._queued_blocks.missing()
        if missing:
            self.fail(KVDataLoss(f"finish() before every block was sent of layers {missing}"))
        with self._cond:
            self._start()   # none queued: the call still carries the header and the commit
            if not self._cond.wait_for(lambda: self._ended or self._error is not None, self._timeout * 2):
                self._error = self._error or TransferTimeout(  # the pair's queue, then the token worker's commit
                    f"the token worker did not acknowledge the KV within {self._timeout:g} s")
        if self._error is not None:
            self.abort()
            raise self._error
        return TransferResult(bytes=self._bytes, seconds=time.perf_counter() - self._started)

    def abort(self) -> None:
        self.fail(TransferAborted("transfer aborted by the prompt worker"))
        if self._pair is not None and not self._released.is_set():
            self._pair.submit(AbortItem(self), self._timeout)
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

    def layer_sent(self, item: LayerItem) -> bool:
        """Counts a sent layer or piece; True when it was the last one."""
        with self._cond:
            self._blocks_sent += len(item.ids)
            self._cond.notify_all()
            return self._blocks_sent == self._total_blocks

    def owes_abort_frame(self) -> bool:
        """Accepted by the token worker, which still expects blocks that will not come."""
        with self._cond:
            return self._accepted and self._blocks_sent < self._total_blocks

    @property
    def _total_blocks(self) -> int:
        return self.num_layers * self._shape.blocks_to_send

    def release(self) -> None:
        self._released.set()

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
            if _pair_lost(code, details):
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


def _pair_lost(code: grpc.StatusCode, details: str) -> bool:
    """Whether a refused Push means the pair itself is gone (the token worker restarted and forgot the
    group, or the group failed), not only this transfer (e.g. a NOT_FOUND for cached blocks it evicted)."""
    gone = code is grpc.StatusCode.NOT_FOUND and details.startswith(kv_group.GROUP_GONE)
    return gone or code is grpc.StatusCode.UNAVAILABLE


_transfer_ids = itertools.count(1)


# ---- one token worker ----

class Pair:
    """This prompt worker's side of the data link with one token worker, and the thread that sends over it."""

    def __init__(self, addr: str, channel: grpc.Channel, layout: KVLayout, device: torch.device,
                 link: LinkKind, timeout: float, max_queued: int):
        self.addr = addr
        self.device = device
        self.layout = layout
        self.group_id = uuid.uuid4().hex
        self.stub = pb_grpc.KVGroupStub(channel)
        self.timeout = timeout
        self._max_queued = max_queued
        self._cond = threading.Condition()
        self._queue: collections.deque[QueueItem] = collections.deque()
        self._error: kv_group.GroupBroken | None = None
        self._live: set[PairKVSender] = set()
        host = addr.rsplit(":", 1)[0].strip("[]").removeprefix("dns:")
        backend = link.backend_for(device)
        endpoint = self._connect(host, backend)
        peer = Peer(addr, host, endpoint.store_port, self.group_id, backend, device, layout, timeout)
        self.link = link(peer, self._layer_sent)
        self._thread = threading.Thread(target=self._run, name=f"kv-pair-{addr}", daemon=True)
        self._thread.start()

    @property
    def error(self) -> kv_group.GroupBroken | None:
        return self._error

    def submit(self, item: LayerItem | AbortItem, timeout: float) -> None:
        sender = item.sender
        with self._cond:
            if self._error is not None:
                sender.fail(self._error)
                sender.release()
                return
            if not self._cond.wait_for(lambda: len(self._queue) < self._max_queued or self._error is not None,
                                       timeout):
                self._error = kv_group.GroupBroken(f"KV queue to {self.addr} made no progress for {timeout:g} s")
            if self._error is None:
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
                self._queue.append(CloseItem())
                self._cond.notify_all()
        self._thread.join(self.timeout)

    def _connect(self, host: str, backend: str) -> pb.KVGroupEndpoint:
        """The token worker's side of the pair (KVGroup.Connect: backend and layout checked there)."""
        request = pb.KVGroupConnect(group_id=self.group_id, backend=backend, layout=self.layout.to_proto(), host=host)
        try:
            return self.stub.Connect(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise error_from_status(exc.code(), exc.details() or "") from exc

    def _next(self, block: bool) -> QueueItem | IdleItem | None:
        """The next queued item; IdleItem when there is none and `block` is False; None once broken."""
        with self._cond:
            if block:
                self._cond.wait_for(lambda: self._queue or self._error is not None)
            if self._error is not None:
                return None
            if not self._queue:
                return IdleItem()
            item = self._queue.popleft()
            self._cond.notify_all()
            return item

    def _run(self) -> None:
        try:
            while (item := self._next(block=not self.link.in_flight)) is not None:
                match item:
                    case IdleItem():
                        self.link.retire(self.link.in_flight - 1)
                    case LayerItem():
                        self._send(item)
                    case AbortItem(sender=sender):
                        self.link.retire(0)
                        self._abort(sender)
                    case CloseItem():
                        self.link.retire(0)
                        self.link.send_op(0, kv_group.CLOSE)
                        with self._cond:
                            self._error = kv_group.GroupBroken("the KV transport was closed")
                        break
        except kv_group.GroupBroken as exc:
            log.warning("KV group with %s broken, discarding it: %s", self.addr, exc)
            self.broken(exc)
        self._fail_all()
        self.link.discard()

    def _send(self, item: LayerItem) -> None:
        if item.sender.wants_data() and item.sender.wait_accepted():
            self.link.send_layer(item)

    def _layer_sent(self, item: LayerItem) -> None:
        if item.sender.layer_sent(item):
            self._forget(item.sender)

    def _abort(self, sender: PairKVSender) -> None:
        try:
            if sender.owes_abort_frame():
                self.link.send_op(sender.transfer_id, kv_group.ABORT)
        finally:
            self._forget(sender)

    def _forget(self, sender: PairKVSender) -> None:
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


# ---- the transport ----

class PairKVTransport:
    """Sends KV to token workers over one pooled `link` per token worker address (see `nccl_kv`, `tcp_kv`)."""

    def __init__(self, name: str, link: LinkKind, *, device: str | torch.device = "cpu",
                 timeout: float = TIMEOUT, max_queued_layers: int = DEFAULT_MAX_QUEUED_LAYERS):
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if max_queued_layers < 1:
            raise ValueError(f"max_queued_layers must be >= 1, got {max_queued_layers}")
        self.name = name
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.link = link
        self.backend = link.backend_for(self.device)
        self._timeout = timeout
        self._max_queued = max_queued_layers
        self._channels = Channels()
        self._pairs: dict[str, Pair] = {}
        self._locks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)
        self._lock = threading.Lock()

    def open(self, addr: str, header: pb.KVHeader) -> PairKVSender:
        check_header(header)
        try:
            pair = self._pair(addr, KVLayout.from_proto(header.layout))
        except TransferError as exc:
            return PairKVSender(None, header, self._timeout, error=exc)
        return PairKVSender(pair, header, self._timeout)

    def close(self) -> None:
        with self._lock:
            pairs, self._pairs = list(self._pairs.values()), {}
        for pair in pairs:
            pair.close()
        self._channels.close()

    def __enter__(self) -> PairKVTransport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _pair(self, addr: str, layout: KVLayout) -> Pair:
        with self._lock:
            addr_lock = self._locks[addr]
        with addr_lock:  # one rendezvous at a time per token worker
            with self._lock:
                pair = self._pairs.get(addr)
                if pair is not None and pair.error is None and pair.layout == layout:
                    return pair
            if pair is not None:
                pair.close()
            pair = Pair(addr, self._channels.get(addr), layout, self.device, self.link, self._timeout,
                        self._max_queued)
            with self._lock:
                self._pairs[addr] = pair
            return pair
