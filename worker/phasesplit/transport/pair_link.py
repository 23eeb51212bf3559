"""What a pair's sender (`pair_kv`) asks of its data link, and what it hands it.

A link is made per token worker from a `Peer` (what `KVGroup.Connect` answered) and sends the
layers the pair's thread takes from its queue; `nccl_kv.GroupLink` sends them over a process
group, `tcp_kv.SocketLink` over a TCP connection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from phasesplit.transport.layout import KVLayout

if TYPE_CHECKING:
    from phasesplit.transport.pair_kv import PairKVSender


@dataclass(slots=True)
class LayerItem:
    """One layer (or a piece of it) of one transfer: blocks `ids` of the caches `k` and `v`, the
    sequence's blocks from position `first` on."""

    sender: PairKVSender
    layer: int
    k: torch.Tensor
    v: torch.Tensor
    ids: list[int]
    first: int
    ready: object | None  # accelerator event recorded after the layer was written


@dataclass(frozen=True, slots=True)
class Peer:
    """Where a link goes: the token worker's side of one pair, as `Connect` answered it."""

    addr: str
    host: str
    port: int
    group_id: str
    backend: str
    device: torch.device
    layout: KVLayout
    timeout: float


class Link(Protocol):
    """A pair's data path; every method raises kv_group.GroupBroken when the path failed."""

    @property
    def in_flight(self) -> int:
        """Frames started and not yet completed."""

    def send_layer(self, item: LayerItem) -> None:
        """Start sending one layer's frame; `sent(item)` (given to the link) once it completed."""

    def retire(self, keep: int) -> None:
        """Complete the oldest frames in flight until at most `keep` remain."""

    def send_op(self, transfer_id: int, op: int) -> None:
        """Send a frame without data (kv_group.ABORT, CLOSE)."""

    def discard(self) -> None:
        """Tear the path down without waiting on the peer."""


class LinkKind(Protocol):
    def backend_for(self, device: torch.device) -> str:
        """The data path's name in `KVGroupConnect.backend`."""

    def __call__(self, peer: Peer, sent: Callable[[LayerItem], None]) -> Link:
        """Join the token worker's side."""
