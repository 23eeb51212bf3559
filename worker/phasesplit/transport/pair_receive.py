"""The token worker's side shared by the per-pair backends (nccl, tcp): the `KVGroup` control service.

`Connect` checks the backend and the layout, then this side of a new pair's link forms in a
thread (the `Listener` makes the link: a process group in `nccl_receive`, a TCP connection in
`tcp_receive`). Each pair has one receiving thread: the link reads frames and writes each layer's
K and V into the transfer's `KVDestination`. `Push` reserves the blocks (`KVSink.begin`), answers
`accepted`, and answers `committed` once every layer arrived; a stall past the timeout, a
cancelled call, an ABORT frame or a broken link frees the blocks instead. Frames of a transfer
that already ended are read and dropped, so the link stays usable.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

import grpc
import torch

from phasesplit.transport import kv_group
from phasesplit.transport.base import (
    K, V, KVDestination, KVSink, LayoutMismatch, TransferAborted, TransferError, TransferTimeout, check_header,
    num_prompt_blocks, status_of,
)
from phasesplit.transport.layout import KVLayout, as_layout
from phasesplit.v1 import worker_pb2 as pb
from phasesplit.v1 import worker_pb2_grpc as pb_grpc

IDLE_TIMEOUT = 3600.0  # an idle link is discarded after this long; its peer makes a new one


def check_options(timeout: float, port: int) -> None:
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port (of the rendezvous store) must be in [0, 65535], got {port}")


class Incoming:
    """One transfer's progress: how many blocks of each layer arrived into its destination (a layer
    comes whole or in pieces, in order, from the first block the token worker does not hold)."""

    def __init__(self, dest: KVDestination, header: pb.KVHeader):
        self.dest = dest
        self.request_id = header.request_id
        self.num_layers = header.layout.num_layers
        self.num_blocks = num_prompt_blocks(header)
        self.first_block = header.num_cached_blocks  # blocks before it are held here already: they do not come
        self.received = [self.first_block] * self.num_layers
        self.bytes = 0
        self.error: TransferError | None = None
        self.progress = time.monotonic()
        self.cond = threading.Condition()
        self.ended = False  # committed or failed: the destination is no longer ours to touch

    def complete(self) -> bool:
        return all(n == self.num_blocks for n in self.received)

    def accepts(self, layer: int, first: int, num_blocks: int) -> bool:
        """Whether a frame of blocks [first, first + num_blocks) of `layer` is to be stored (a bad one
        fails the transfer)."""
        with self.cond:
            if self.ended:
                return False
            if (not 0 <= layer < self.num_layers or first != self.received[layer] or num_blocks < 1
                    or first + num_blocks > self.num_blocks):
                self._fail(TransferError(f"bad frame: layer {layer} blocks [{first}, {first + num_blocks}) (expected "
                                         f"each of {self.num_layers} layers' blocks [{self.first_block}, "
                                         f"{self.num_blocks}) once, in order)"))
                return False
            return True

    def stored(self, layer: int, num_blocks: int, nbytes: int) -> None:
        with self.cond:
            self.received[layer] += num_blocks
            self.bytes += nbytes
            self.progress = time.monotonic()
            self.cond.notify_all()

    def write(self, layer: int, first: int, frame: torch.Tensor) -> None:
        """frame: [2, num_blocks, block_size, kv_heads, head_dim] (K, V) of `layer`'s blocks from `first` on."""
        if not self.accepts(layer, first, frame.shape[1]):
            return
        try:
            for kind in (K, V):
                self.dest.write_tensor(layer, kind, first, frame[kind])
        except Exception as exc:  # noqa: BLE001 - the destination refused (freed, aborted): drop the frame
            self.fail(TransferAborted(f"writing layer {layer} failed: {exc}"))
            return
        self.stored(layer, frame.shape[1], frame.numel() * frame.element_size())

    def commit(self) -> bool:
        with self.cond:
            if self.ended:
                return False
            self.ended = True
        try:
            self.dest.commit()
        except TransferError as exc:  # the request was aborted here while its last layers arrived
            self.error = exc
            return False
        return True

    def fail(self, error: TransferError) -> None:
        with self.cond:
            self._fail(error)

    def _fail(self, error: TransferError) -> None:
        if self.ended:
            return
        self.ended, self.error = True, error
        self.cond.notify_all()
        self.dest.abort()


class ReceiveLink(Protocol):
    """This side of one pair's data path; join and receive raise kv_group.GroupBroken when it fails."""

    def join(self) -> None:
        """Wait until the prompt worker's side joined."""

    def receive(self, group: Group) -> None:
        """Read frames into `group`'s transfers until the prompt worker closes the link."""

    def discard(self) -> None:
        """Tear the path down without waiting on the peer; a join or receive under way fails."""


class Listener(Protocol):
    """Where prompt workers join a token worker's pairs: its `port` goes back in KVGroupEndpoint."""

    backend: str  # what KVGroupConnect.backend must name
    port: int

    def link(self, group_id: str, bind_host: str) -> ReceiveLink: ...

    def close(self) -> None: ...


class Group:
    """The token worker's side of one pair and its receiving thread."""

    def __init__(self, service: KVGroupService, group_id: str, link: ReceiveLink):
        self.service = service
        self.group_id = group_id
        self.link = link
        self.transfers: dict[int, Incoming] = {}
        self.lock = threading.Lock()
        self.error = ""
        self.thread = threading.Thread(target=self._run, name=f"kv-group-{group_id[:8]}", daemon=True)

    def expect(self, transfer_id: int, incoming: Incoming) -> bool:
        with self.lock:
            if self.error:
                return False
            self.transfers[transfer_id] = incoming
            return True

    def incoming(self, transfer_id: int) -> Incoming | None:
        with self.lock:
            return self.transfers.get(transfer_id)

    def forget(self, transfer_id: int) -> None:
        with self.lock:
            self.transfers.pop(transfer_id, None)

    def discard(self) -> None:
        self.link.discard()

    def broken(self, error: str) -> None:
        with self.lock:
            self.error = error
            transfers, self.transfers = list(self.transfers.values()), {}
        for incoming in transfers:  # UNAVAILABLE: the prompt worker drops the pair before it opens another transfer
            incoming.fail(kv_group.GroupBroken(f"KV group failed: {error}"))

    def _run(self) -> None:
        try:
            self.link.join()
            self.link.receive(self)
        except kv_group.GroupBroken as exc:
            self.broken(str(exc))
        finally:
            self.service.drop(self)
            self.link.discard()
            self.service.ended(self)


class KVGroupService(pb_grpc.KVGroupServicer):
    """Serves `KVGroup` on a token (or mixed) worker; prompt workers join its pairs through `listener`."""

    def __init__(self, sink: KVSink, layout: KVLayout | pb.KVLayout, device: torch.device, listener: Listener, *,
                 timeout: float):
        self.sink = sink
        self.layout = as_layout(layout)
        self.device = device
        self.listener = listener
        self.backend = listener.backend
        self.timeout = timeout
        self._groups: dict[str, Group] = {}
        self._running: set[Group] = set()  # groups whose thread has not ended, registered or not
        self._lock = threading.Lock()

    def add_to_server(self, server: grpc.Server) -> None:
        pb_grpc.add_KVGroupServicer_to_server(self, server)

    def groups(self) -> int:
        with self._lock:
            return len(self._groups)

    def close(self) -> None:
        """Stop listening, tear down every link and wait for its thread: a gloo group still receiving
        when the process exits aborts it ("terminate called without an active exception")."""
        self.listener.close()
        with self._lock:
            groups, self._groups = list(self._running), {}
        for group in groups:
            group.discard()
        for group in groups:
            group.thread.join(self.timeout)

    def ended(self, group: Group) -> None:
        with self._lock:
            self._running.discard(group)

    def drop(self, group: Group) -> None:
        with self._lock:
            if self._groups.get(group.group_id) is group:
                del self._groups[group.group_id]

    def Connect(self, request: pb.KVGroupConnect, context) -> pb.KVGroupEndpoint:
        if request.backend != self.backend:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"backend: this token worker's KV cache is on {self.device}, which takes "
                          f"{self.backend!r}, got {request.backend!r}")
        if not request.group_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "group_id: must not be empty")
        try:
            self.layout.check(as_layout(request.layout))
        except LayoutMismatch as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        with self._lock:
            if request.group_id in self._groups:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"group_id: {request.group_id} is in use")
            group = Group(self, request.group_id, self.listener.link(request.group_id, request.host or "127.0.0.1"))
            self._groups[request.group_id] = group
            self._running.add(group)
        group.thread.start()
        return pb.KVGroupEndpoint(store_port=self.listener.port)

    def Push(self, request: pb.KVGroupPush, context):
        with self._lock:
            group = self._groups.get(request.group_id)
        if group is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"{kv_group.GROUP_GONE} {request.group_id!r} on this worker")
        header = request.header
        try:
            check_header(header)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        incoming = self._begin(header, context)
        context.add_callback(lambda: incoming.fail(TransferAborted("the prompt worker cancelled the transfer")))
        if not group.expect(request.transfer_id, incoming):
            incoming.fail(TransferAborted(f"KV group failed: {group.error}"))
            context.abort(grpc.StatusCode.UNAVAILABLE, f"KV group failed: {group.error}")
        try:
            yield pb.KVGroupEvent(accepted=True)
            self._wait(incoming, context)
            yield pb.KVGroupEvent(committed=True, bytes_received=incoming.bytes)
        finally:
            group.forget(request.transfer_id)
            incoming.fail(TransferAborted("the transfer ended before every layer arrived"))

    def _begin(self, header: pb.KVHeader, context) -> Incoming:
        try:
            return Incoming(self.sink.begin(header), header)
        except TransferError as exc:
            context.abort(status_of(exc), str(exc))

    def _wait(self, incoming: Incoming, context) -> None:
        with incoming.cond:
            while not incoming.ended and not incoming.complete():
                if time.monotonic() - incoming.progress > self.timeout:
                    incoming._fail(TransferTimeout(f"no KV data for {self.timeout:g} s"))
                    break
                incoming.cond.wait(min(0.5, self.timeout / 4))
        if incoming.complete() and incoming.commit():
            return
        context.abort(status_of(incoming.error), f"request {incoming.request_id}: KV transfer failed: {incoming.error}")
