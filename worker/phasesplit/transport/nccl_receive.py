"""The token worker's side of process-group KV transfers: the `KVGroup` service.

`Connect` checks the backend and the layout fingerprint, then this side (rank 0) of a new pair
group forms in a thread over the store this service hosts. Each group has one receiving thread:
it reads frames (see `kv_group`) and writes each layer's K and V into the transfer's
`KVDestination`. `Push` reserves the blocks (`KVSink.begin`), answers `accepted`, and answers
`committed` once every layer arrived; a stall past the timeout, a cancelled call, an ABORT frame
or a broken group frees the blocks instead. Frames of a transfer that already ended are read
and dropped, so the group stays usable.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc
import torch

from phasesplit.transport import kv_group
from phasesplit.transport.base import (
    K, V, KVDestination, KVSink, LayoutMismatch, TransferAborted, TransferError, TransferTimeout, check_header,
    check_layout, num_prompt_blocks, status_of,
)
from phasesplit.v1 import worker_pb2 as pb
from phasesplit.v1 import worker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 3600.0  # an idle group is discarded after this long; its peer makes a new one


class _Incoming:
    """One transfer's progress: which layers arrived into its destination."""

    def __init__(self, dest: KVDestination, header: pb.KVHeader):
        self.dest = dest
        self.request_id = header.request_id
        self.num_layers = header.layout.num_layers
        self.num_blocks = num_prompt_blocks(header)
        self.layers: set[int] = set()
        self.bytes = 0
        self.error: TransferError | None = None
        self.progress = time.monotonic()
        self.cond = threading.Condition()
        self.ended = False  # committed or failed: the destination is no longer ours to touch

    def complete(self) -> bool:
        return len(self.layers) == self.num_layers

    def accepts(self, layer: int, num_blocks: int) -> bool:
        """Whether a frame of `layer` with `num_blocks` blocks is to be stored (a bad one fails the transfer)."""
        with self.cond:
            if self.ended:
                return False
            if num_blocks != self.num_blocks or not 0 <= layer < self.num_layers or layer in self.layers:
                self._fail(TransferError(f"bad frame: layer {layer} with {num_blocks} blocks "
                                         f"(expected each of {self.num_layers} layers once, {self.num_blocks} blocks)"))
                return False
            return True

    def stored(self, layer: int, nbytes: int) -> None:
        with self.cond:
            self.layers.add(layer)
            self.bytes += nbytes
            self.progress = time.monotonic()
            self.cond.notify_all()

    def write(self, layer: int, frame: torch.Tensor) -> None:
        """frame: [2, num_blocks, block_size, kv_heads, head_dim] (K, V) of `layer`."""
        if not self.accepts(layer, frame.shape[1]):
            return
        try:
            for kind in (K, V):
                self.dest.write_tensor(layer, kind, 0, frame[kind])
        except Exception as exc:  # noqa: BLE001 - the destination refused (freed, aborted): drop the frame
            self.fail(TransferAborted(f"writing layer {layer} failed: {exc}"))
            return
        self.stored(layer, frame.numel() * frame.element_size())

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


class _Group:
    """The token worker's side of one pair group and its receiving thread."""

    def __init__(self, service: KVGroupService, group_id: str, bind_host: str):
        self.service = service
        self.group_id = group_id
        self.bind_host = bind_host
        self.transfers: dict[int, _Incoming] = {}
        self.lock = threading.Lock()
        self.error = ""
        self.pg = None
        self.cuda = service.device.type == "cuda"
        self.thread = threading.Thread(target=self._run, name=f"kv-group-{group_id[:8]}", daemon=True)

    def expect(self, transfer_id: int, incoming: _Incoming) -> bool:
        with self.lock:
            if self.error:
                return False
            self.transfers[transfer_id] = incoming
            return True

    def forget(self, transfer_id: int) -> None:
        with self.lock:
            self.transfers.pop(transfer_id, None)

    def _run(self) -> None:
        service = self.service
        try:
            self.pg = self._join()
            self._receive()
        except kv_group.GroupBroken as exc:
            self._broken(str(exc))
        finally:
            service.drop(self)
            self.discard()
            self.pg = None  # destroyed now, with its threads, not by the interpreter at exit
            service.ended(self)

    def _join(self):
        service = self.service
        return kv_group.make_group(service.backend, service.store, self.group_id, kv_group.TOKEN_RANK,
                                   self.bind_host, service.timeout)

    def discard(self) -> None:
        kv_group.discard(self.pg)

    def _receive(self) -> None:
        """Read frames until CLOSE. While layer i is stored into its destination, layer i+1 is already
        arriving into the other buffer when the sender is ahead."""
        service = self.service
        buffers = kv_group.Buffers(2, kv_group.frame_dtype(service.layout), service.device)
        meta = torch.empty(kv_group.META_LEN, dtype=torch.int64, device=service.device)
        meta_work = kv_group.irecv(self.pg, meta, kv_group.PROMPT_RANK, "waiting for a KV frame")
        stored = None  # (incoming, layer, frame) received and not yet written
        frames = 0
        while True:
            kv_group.wait(meta_work, service.idle_timeout, "waiting for a KV frame", cuda=self.cuda)
            transfer_id, layer, num_blocks, op = meta.tolist()
            if op == kv_group.CLOSE:
                self._store(stored)
                self._broken("the prompt worker closed the KV group")
                return
            with self.lock:
                incoming = self.transfers.get(transfer_id)
            if op == kv_group.ABORT:
                self._store(stored)
                stored = None
                if incoming is not None:
                    incoming.fail(TransferAborted("aborted by the prompt worker"))
                meta_work = kv_group.irecv(self.pg, meta, kv_group.PROMPT_RANK, "waiting for a KV frame")
                continue
            frame = buffers.get(frames % 2, kv_group.frame_shape(service.layout, num_blocks))
            frames += 1
            what = f"receiving layer {layer}"
            works = [kv_group.irecv(self.pg, half, kv_group.PROMPT_RANK, what) for half in frame]
            meta_work = kv_group.irecv(self.pg, meta, kv_group.PROMPT_RANK, "waiting for a KV frame")
            self._store(stored)
            for work in works:
                kv_group.wait(work, service.timeout, what, cuda=self.cuda)
            stored = (incoming, layer, frame)
            if not meta_work.is_completed():  # no next frame yet: store this one now, not after it
                self._store(stored)
                stored = None

    def _store(self, stored) -> None:
        if stored is not None and stored[0] is not None:
            stored[0].write(stored[1], stored[2])

    def _broken(self, error: str) -> None:
        with self.lock:
            self.error = error
            transfers, self.transfers = list(self.transfers.values()), {}
        for incoming in transfers:
            incoming.fail(TransferAborted(f"KV group failed: {error}"))


class KVGroupService(pb_grpc.KVGroupServicer):
    """Serves `KVGroup` on a token (or mixed) worker; hosts the rendezvous store on `store_port`."""

    def __init__(self, sink: KVSink, layout, device: str | torch.device, *, timeout: float = 30.0,
                 port: int = 0, idle_timeout: float = IDLE_TIMEOUT):
        store_port = port
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if not 0 <= store_port <= 65535:
            raise ValueError(f"port (of the rendezvous store) must be in [0, 65535], got {store_port}")
        self.sink = sink
        self.layout = layout
        self.device = torch.device(device)
        self.backend = kv_group.backend_for(self.device)
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.store = self._listen(store_port)
        self._groups: dict[str, _Group] = {}
        self._running: set[_Group] = set()  # groups whose thread has not ended, registered or not
        self._lock = threading.Lock()

    group_class = _Group

    def _listen(self, port: int):
        """Where the prompt workers join (rendezvous store); its `port` goes back in KVGroupEndpoint."""
        try:
            return kv_group.host_store(port, self.timeout)
        except (RuntimeError, OSError) as exc:
            raise OSError(f"cannot host the KV rendezvous store on port {port}: {exc}") from exc

    @property
    def store_port(self) -> int:
        return self.store.port

    def add_to_server(self, server: grpc.Server) -> None:
        pb_grpc.add_KVGroupServicer_to_server(self, server)

    def groups(self) -> int:
        with self._lock:
            return len(self._groups)

    def close(self) -> None:
        """Tear down every group and wait for its thread: a gloo group still receiving when the
        process exits aborts it ("terminate called without an active exception")."""
        with self._lock:
            groups, self._groups = list(self._running), {}
        for group in groups:
            group.discard()
        for group in groups:
            group.thread.join(self.timeout)

    def ended(self, group: _Group) -> None:
        with self._lock:
            self._running.discard(group)

    def drop(self, group: _Group) -> None:
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
            check_layout(self.layout, request.layout)
        except LayoutMismatch as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        group = self.group_class(self, request.group_id, request.host or "127.0.0.1")
        with self._lock:
            if request.group_id in self._groups:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"group_id: {request.group_id} is in use")
            self._groups[request.group_id] = group
            self._running.add(group)
        group.thread.start()
        return pb.KVGroupEndpoint(store_port=self.store_port)

    def Push(self, request: pb.KVGroupPush, context):
        with self._lock:
            group = self._groups.get(request.group_id)
        if group is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"group_id: no KV group {request.group_id!r} on this worker")
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

    def _begin(self, header: pb.KVHeader, context) -> _Incoming:
        try:
            return _Incoming(self.sink.begin(header), header)
        except TransferError as exc:
            context.abort(status_of(exc), str(exc))

    def _wait(self, incoming: _Incoming, context) -> None:
        with incoming.cond:
            while not incoming.ended and not incoming.complete():
                if time.monotonic() - incoming.progress > self.timeout:
                    incoming._fail(TransferTimeout(f"no KV data for {self.timeout:g} s"))
                    break
                incoming.cond.wait(min(0.5, self.timeout / 4))
        if incoming.complete() and incoming.commit():
            return
        context.abort(status_of(incoming.error), f"request {incoming.request_id}: KV transfer failed: {incoming.error}")
