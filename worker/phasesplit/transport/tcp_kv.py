"""KV over plain TCP (`--kv-backend tcp`): gRPC for control, a pooled socket per worker pair for the bytes.

The control path is the nccl backend's (`KVGroup.Connect` checks the layout and answers the token
worker's data port; each transfer is one `KVGroup.Push`: reserve, `accepted`, `committed`; errors,
timeouts and aborts as there). Only the data path differs: instead of a process group, one TCP
connection per token worker address (see `sockets` for the frames), made on first use, reused by
every transfer to that worker, and discarded when a send fails or stalls past the timeout; that
fails only the transfers on it (the router retries them), and the next transfer connects anew.

The pair's thread sends each layer with `sendmsg` straight from the cache blocks (one view per
run of consecutive blocks; an accelerator's blocks are gathered into pinned host memory first).
"""

from __future__ import annotations

import socket
import uuid

import torch

from phasesplit.transport import kv_group, sockets
from phasesplit.transport.base import K, V
from phasesplit.transport.blocks import read_pieces, to_host
from phasesplit.transport.nccl_kv import NcclKVSender, NcclKVTransport, _Pair
from phasesplit.v1 import worker_pb2 as pb


class _SocketPair(_Pair):
    """This prompt worker's connection to one token worker, and the thread that sends over it."""

    @staticmethod
    def link_backend(device: torch.device) -> str:
        return "tcp"

    def _join(self, host: str, endpoint: pb.KVGroupEndpoint) -> socket.socket:
        try:
            sock = socket.create_connection((host, endpoint.store_port), timeout=self.timeout)
            sockets.tune(sock, self.timeout)
            sock.sendall(sockets.HELLO.pack(sockets.MAGIC, uuid.UUID(self.group_id).bytes))
        except OSError as exc:
            raise kv_group.GroupBroken(f"cannot reach the KV port {host}:{endpoint.store_port}: {exc}") from exc
        return sock

    def _send_layer(self, sender: NcclKVSender, layer: int, k, v, ids: list[int], ready) -> None:
        if not sender.wants_data() or not sender.wait_accepted():
            return
        views = []
        for cache in (k, v):
            host, host_ids = to_host(cache, ids, ready)
            views.append(read_pieces(host, host_ids, 0, len(host_ids)))
        try:
            self.group.sendall(sockets.FRAME.pack(sender.transfer_id, layer, len(ids), kv_group.DATA))
            crcs = [sockets.send_views(self.group, views[kind]) for kind in (K, V)]
            self.group.sendall(sockets.TRAILER.pack(*crcs))
        except OSError as exc:
            raise kv_group.GroupBroken(f"sending layer {layer} to {self.addr} failed: {exc}") from exc
        if sender.layer_sent():
            self._forget(sender)

    def _retire(self, keep: int) -> None:
        """Nothing in flight: a layer is sent when sendmsg returns."""

    def _send_frame(self, transfer_id: int, layer: int, num_blocks: int, op: int) -> None:
        try:
            self.group.sendall(sockets.FRAME.pack(transfer_id, layer, num_blocks, op))
        except OSError as exc:
            raise kv_group.GroupBroken(f"sending a frame to {self.addr} failed: {exc}") from exc

    def _discard(self) -> None:
        if self.group is not None:
            self.group.close()


class TcpKVTransport(NcclKVTransport):
    """Sends KV to token workers over one pooled TCP connection per token worker address."""

    name = "tcp"
    pair_class = _SocketPair
