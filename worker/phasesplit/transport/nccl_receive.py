"""The token worker's side of process-group KV transfers: pairs join over a rendezvous store this worker hosts.

The control service is `pair_receive.KVGroupService`; here each pair's link is this side (rank 0)
of a 2-rank group (see `kv_group`), and its thread receives frames into two reused buffers.
"""

from __future__ import annotations

import torch

from phasesplit.transport import kv_group
from phasesplit.transport.backends import TIMEOUT
from phasesplit.transport.base import KVSink, TransferAborted
from phasesplit.transport.layout import KVLayout, as_layout
from phasesplit.transport.pair_receive import IDLE_TIMEOUT, Group, Incoming, KVGroupService, check_options
from phasesplit.v1 import worker_pb2 as pb

_WAITING = "waiting for a KV frame"


class StoreListener:
    """The rendezvous store (a TCPStore on the worker's address) where prompt workers form their pair groups."""

    def __init__(self, port: int, device: torch.device, layout: KVLayout, timeout: float, idle_timeout: float,
                 host: str = ""):
        self.backend = kv_group.backend_for(device)
        self.device, self.layout = device, layout
        self.timeout, self.idle_timeout = timeout, idle_timeout
        try:
            self.store, self._socket = kv_group.host_store(port, timeout, host)
        except (RuntimeError, OSError) as exc:
            raise OSError(f"cannot host the KV rendezvous store on port {port}: {exc}") from exc

    @property
    def port(self) -> int:
        return self.store.port

    def link(self, group_id: str, bind_host: str) -> GroupReceiveLink:
        return GroupReceiveLink(self, group_id, bind_host)

    def close(self) -> None:
        """The store lives as long as this worker."""


class GroupReceiveLink:
    """This side of one pair's process group."""

    def __init__(self, listener: StoreListener, group_id: str, bind_host: str):
        self._listener = listener
        self._group_id, self._bind_host = group_id, bind_host
        self._cuda = listener.device.type == "cuda"
        self.pg = None

    def join(self) -> None:
        listener = self._listener
        self.pg = kv_group.make_group(listener.backend, listener.store, self._group_id, kv_group.TOKEN_RANK,
                                      self._bind_host, listener.timeout)

    def discard(self) -> None:
        pg, self.pg = self.pg, None  # destroyed now, with its threads, not by the interpreter at exit
        kv_group.discard(pg)

    def receive(self, group: Group) -> None:
        """Read frames until CLOSE. While layer i is stored into its destination, layer i+1 is already
        arriving into the other buffer when the sender is ahead."""
        listener = self._listener
        layout, device = listener.layout, listener.device
        buffers = kv_group.Buffers(2, layout.torch_dtype, device)
        meta = torch.empty(kv_group.META_LEN, dtype=torch.int64, device=device)
        meta_work = kv_group.irecv(self.pg, meta, kv_group.PROMPT_RANK, _WAITING)
        stored = None  # (incoming, layer, first block, frame) received and not yet written
        frames = 0
        while True:
            kv_group.wait(meta_work, listener.idle_timeout, _WAITING, cuda=self._cuda)
            transfer_id, layer, first, num_blocks, op = meta.tolist()
            if op == kv_group.CLOSE:
                _store(stored)
                group.broken("the prompt worker closed the KV group")
                return
            incoming = group.incoming(transfer_id)
            if op == kv_group.ABORT:
                _store(stored)
                stored = None
                if incoming is not None:
                    incoming.fail(TransferAborted("aborted by the prompt worker"))
                meta_work = kv_group.irecv(self.pg, meta, kv_group.PROMPT_RANK, _WAITING)
                continue
            frame = buffers.get(frames % 2, kv_group.frame_shape(layout, num_blocks))
            frames += 1
            what = f"receiving layer {layer}"
            works = [kv_group.irecv(self.pg, half, kv_group.PROMPT_RANK, what) for half in frame]
            meta_work = kv_group.irecv(self.pg, meta, kv_group.PROMPT_RANK, _WAITING)
            _store(stored)
            for work in works:
                kv_group.wait(work, listener.timeout, what, cuda=self._cuda)
            stored = (incoming, layer, first, frame)
            if not meta_work.is_completed():  # no next frame yet: store this one now, not after it
                _store(stored)
                stored = None


def _store(stored: tuple[Incoming | None, int, int, torch.Tensor] | None) -> None:
    if stored is not None and stored[0] is not None:
        stored[0].write(*stored[1:])


class NcclKVReceiver(KVGroupService):
    """Serves `KVGroup` for the nccl backend on a token worker; hosts the rendezvous store on `port`."""

    def __init__(self, sink: KVSink, layout: KVLayout | pb.KVLayout, device: str | torch.device, *,
                 timeout: float = TIMEOUT, port: int = 0, idle_timeout: float = IDLE_TIMEOUT, host: str = ""):
        check_options(timeout, port)
        device = torch.device(device)
        listener = StoreListener(port, device, as_layout(layout), timeout, idle_timeout, host)
        super().__init__(sink, layout, device, listener, timeout=timeout)
