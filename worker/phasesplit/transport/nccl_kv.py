"""KV over a process group (`--kv-backend nccl`): gRPC for control (`pair_kv`), send/recv for the tensors.

Each pair's link is a 2-rank group (NCCL for CUDA caches, gloo for CPU caches; see `kv_group`)
formed over the token worker's rendezvous store. Up to MAX_FRAMES_IN_FLIGHT layers are sent
asynchronously; a layer whose blocks are one slice of the cache goes straight from it, any other
is gathered into a reused frame buffer first. The token worker's side is `nccl_receive`.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import torch

from phasesplit.transport import kv_group
from phasesplit.transport.pair_kv import PairKVTransport
from phasesplit.transport.pair_link import LayerItem, Peer

MAX_FRAMES_IN_FLIGHT = 4  # layers sent and not yet received, per pair


class GroupLink:
    """A pair's data path over a process group with the token worker."""

    backend_for = staticmethod(kv_group.backend_for)

    def __init__(self, peer: Peer, sent: Callable[[LayerItem], None]):
        self._peer = peer
        self._sent = sent
        self._cuda = peer.device.type == "cuda"
        self._buffers = kv_group.Buffers(MAX_FRAMES_IN_FLIGHT, peer.layout.torch_dtype, peer.device)
        self._frames = 0
        self._in_flight: collections.deque = collections.deque()  # (item, works, tensors they read, what)
        store = kv_group.connect_store(peer.host, peer.port, peer.timeout)
        bind = kv_group.local_address_towards(peer.host)
        self.group = kv_group.make_group(peer.backend, store, peer.group_id, kv_group.PROMPT_RANK, bind,
                                         peer.timeout)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def send_layer(self, item: LayerItem) -> None:
        if item.ready is not None:
            torch.cuda.current_stream(item.k.device).wait_event(item.ready)
        self.retire(MAX_FRAMES_IN_FLIGHT - 1)
        parts = self._frame(item)
        what = f"sending layer {item.layer} to {self._peer.addr}"
        meta = kv_group.meta(item.sender.transfer_id, item.layer, item.first, len(item.ids), kv_group.DATA,
                             self._peer.device)
        works = [kv_group.isend(self.group, t, kv_group.TOKEN_RANK, what) for t in (meta, *parts)]
        self._in_flight.append((item, works, (meta, *parts), what))

    def retire(self, keep: int) -> None:
        while len(self._in_flight) > max(keep, 0):
            item, works, _tensors, what = self._in_flight.popleft()
            for work in works:
                kv_group.wait(work, self._peer.timeout, what, cuda=self._cuda)
            self._sent(item)

    def send_op(self, transfer_id: int, op: int) -> None:
        meta = kv_group.meta(transfer_id, 0, 0, 0, op, self._peer.device)
        kv_group.send(self.group, meta, kv_group.TOKEN_RANK, self._peer.timeout,
                      f"sending a frame to {self._peer.addr}")

    def discard(self) -> None:
        kv_group.discard(self.group)
        self._in_flight.clear()

    def _frame(self, item: LayerItem) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the item's blocks: straight from the cache when they are one slice of it."""
        k, v, ids = item.k, item.v, item.ids
        slot, self._frames = self._frames % MAX_FRAMES_IN_FLIGHT, self._frames + 1
        first = kv_group.one_run(ids)
        if first is not None and k.is_contiguous() and v.is_contiguous():
            return k[first:first + len(ids)], v[first:first + len(ids)]
        frame = self._buffers.get(slot, (2, len(ids), *k.shape[1:]))
        kv_group.gather(frame[0], k, ids)
        kv_group.gather(frame[1], v, ids)
        return frame[0], frame[1]


class NcclKVTransport(PairKVTransport):
    """Sends KV to token workers over per-pair process groups; one group per token worker address."""

    def __init__(self, **options):
        super().__init__("nccl", GroupLink, **options)
