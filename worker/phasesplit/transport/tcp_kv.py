"""KV over plain TCP (`--kv-backend tcp`): gRPC for control (`pair_kv`), a pooled socket per worker pair for the bytes.

The control path is the pair backends' (`KVGroup.Connect` checks the layout and answers the token
worker's data port; each transfer is one `KVGroup.Push`: reserve, `accepted`, `committed`). Each
pair's link is one TCP connection (see `sockets` for the frames); a connection that fails or
stalls past the timeout fails only the transfers on it (the router retries them), and the next
transfer connects anew.

A layer is sent with `sendmsg` straight from the cache blocks (one view per run of consecutive
blocks; an accelerator's blocks are gathered into pinned host memory first).
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable

import torch

from phasesplit.transport import kv_group, sockets
from phasesplit.transport.base import K, V
from phasesplit.transport.blocks import read_pieces, to_host
from phasesplit.transport.pair_kv import PairKVTransport
from phasesplit.transport.pair_link import LayerItem, Peer


class SocketLink:
    """A pair's data path over one TCP connection to the token worker's KV port; nothing stays in flight."""

    in_flight = 0

    @staticmethod
    def backend_for(device: torch.device) -> str:
        return "tcp"

    def __init__(self, peer: Peer, sent: Callable[[LayerItem], None]):
        self._addr = peer.addr
        self._sent = sent
        try:
            self.sock = socket.create_connection((peer.host, peer.port), timeout=peer.timeout)
            sockets.tune(self.sock, peer.timeout)
            self.sock.sendall(sockets.HELLO.pack(sockets.MAGIC, uuid.UUID(peer.group_id).bytes))
        except OSError as exc:
            raise kv_group.GroupBroken(f"cannot reach the KV port {peer.host}:{peer.port}: {exc}") from exc

    def send_layer(self, item: LayerItem) -> None:
        views = []
        for cache in (item.k, item.v):
            host, host_ids = to_host(cache, item.ids, item.ready)
            views.append(read_pieces(host, host_ids, 0, len(host_ids)))
        try:
            self.sock.sendall(sockets.FRAME.pack(item.sender.transfer_id, item.layer, item.first, len(item.ids),
                                                 kv_group.DATA))
            crcs = [sockets.send_views(self.sock, views[kind]) for kind in (K, V)]
            self.sock.sendall(sockets.TRAILER.pack(*crcs))
        except OSError as exc:
            raise kv_group.GroupBroken(f"sending layer {item.layer} to {self._addr} failed: {exc}") from exc
        self._sent(item)

    def retire(self, keep: int) -> None:
        """Nothing in flight: a layer is sent when sendmsg returns."""

    def send_op(self, transfer_id: int, op: int) -> None:
        try:
            self.sock.sendall(sockets.FRAME.pack(transfer_id, 0, 0, 0, op))
        except OSError as exc:
            raise kv_group.GroupBroken(f"sending a frame to {self._addr} failed: {exc}") from exc

    def discard(self) -> None:
        self.sock.close()


class TcpKVTransport(PairKVTransport):
    """Sends KV to token workers over one pooled TCP connection per token worker address."""

    def __init__(self, **options):
        super().__init__("tcp", SocketLink, **options)
