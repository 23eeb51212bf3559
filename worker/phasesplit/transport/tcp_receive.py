"""The token worker's side of tcp transfers: the `KVGroup` control service over a TCP data port.

As for the nccl backend (`nccl_receive`), except that a pair's data path is the TCP connection
the prompt worker opens to `port` after `Connect` (its HELLO names the group). The group's thread
reads frames (see `sockets`) and receives each layer's K and V straight into the transfer's
reserved blocks (`KVDestination.receive`), checking the CRC32C of each. A frame for a transfer
that already ended, or that fails its checksum, is read to its end and dropped (the latter fails
its transfer), so the connection stays usable; a connection that breaks fails only its transfers.
"""

from __future__ import annotations

import socket
import threading
import uuid

from phasesplit.transport import kv_group, sockets
from phasesplit.transport.base import K, V, KVDataLoss, TransferAborted, TransferError, block_bytes, layout_to_proto
from phasesplit.transport.nccl_receive import KVGroupService, _Group, _Incoming

_SCRATCH = 1 << 20


class _SocketGroup(_Group):
    """The token worker's side of one pair connection and its receiving thread."""

    def __init__(self, service: TcpKVReceiver, group_id: str, bind_host: str):
        super().__init__(service, group_id, bind_host)
        self._arrived = threading.Event()
        self._sock: socket.socket | None = None
        self._frame_bytes = block_bytes(layout_to_proto(service.layout))

    def attach(self, sock: socket.socket) -> None:
        self._sock = sock
        self._arrived.set()

    def _join(self) -> socket.socket:
        if not self._arrived.wait(self.service.timeout):
            raise kv_group.GroupBroken(f"no KV connection for group {self.group_id} within {self.service.timeout:g} s")
        return self._sock

    def discard(self) -> None:
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _receive(self) -> None:
        try:
            self._frames(self.pg)
        except (OSError, ValueError) as exc:  # closed, reset, timed out
            raise kv_group.GroupBroken(f"KV connection failed: {exc}") from exc

    def _frames(self, sock: socket.socket) -> None:
        scratch = bytearray(_SCRATCH)
        while True:
            sock.settimeout(self.service.idle_timeout)
            transfer_id, layer, num_blocks, op = sockets.recv_struct(sock, sockets.FRAME)
            sock.settimeout(self.service.timeout)
            with self.lock:
                incoming = self.transfers.get(transfer_id)
            if op == kv_group.CLOSE:
                self._broken("the prompt worker closed the KV connection")
                return
            if op == kv_group.ABORT:
                if incoming is not None:
                    incoming.fail(TransferAborted("aborted by the prompt worker"))
                continue
            self._layer(sock, incoming, layer, num_blocks, scratch)

    def _layer(self, sock: socket.socket, incoming: _Incoming | None, layer: int, num_blocks: int,
               scratch: bytearray) -> None:
        size = num_blocks * self._frame_bytes
        taken = incoming is not None and incoming.accepts(layer, num_blocks)
        crcs = []
        for kind in (K, V):
            if taken:
                taken = self._into_blocks(sock, incoming, layer, kind, num_blocks, crcs)
            if len(crcs) <= kind:  # not received into blocks: keep the connection in step
                sockets.skip(sock, size, scratch)
                crcs.append(None)
        sent = sockets.recv_struct(sock, sockets.TRAILER)
        if not taken:
            return
        for kind, name in ((K, "K"), (V, "V")):
            if crcs[kind] != sent[kind]:
                incoming.fail(KVDataLoss(f"checksum mismatch in layer {layer} {name}"))
                return
        incoming.stored(layer, 2 * size)

    @staticmethod
    def _into_blocks(sock, incoming: _Incoming, layer: int, kind: int, num_blocks: int, crcs: list) -> bool:
        """Receive one K or V into the destination's blocks; False when the destination refused them."""
        try:
            incoming.dest.receive(layer, kind, 0, num_blocks, lambda views: crcs.append(sockets.recv_views(sock, views)))
        except TransferError as exc:  # freed or aborted here meanwhile
            incoming.fail(TransferAborted(f"writing layer {layer} failed: {exc}"))
            return False
        return True


class TcpKVReceiver(KVGroupService):
    """Serves `KVGroup` for the tcp backend on a token worker; the KV bytes arrive on `port`."""

    group_class = _SocketGroup

    def __init__(self, sink, layout, device, *, timeout: float = 30.0, port: int = 0, **options):
        super().__init__(sink, layout, device, timeout=timeout, port=port, **options)
        self.backend = "tcp"
        self._acceptor = threading.Thread(target=self._accept, name="kv-tcp-accept", daemon=True)
        self._acceptor.start()

    def _listen(self, port: int):
        try:
            listener = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True) \
                if socket.has_dualstack_ipv6() else socket.create_server(("0.0.0.0", port))
        except OSError as exc:
            raise OSError(f"cannot listen for KV on port {port}: {exc}") from exc
        return listener

    @property
    def store_port(self) -> int:
        return self.store.getsockname()[1]

    def close(self) -> None:
        try:
            self.store.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.store.close()
        super().close()
        self._acceptor.join(self.timeout)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.store.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._hello, args=(sock,), name="kv-tcp-hello", daemon=True).start()

    def _hello(self, sock: socket.socket) -> None:
        try:
            sockets.tune(sock, self.timeout)
            magic, group_id = sockets.recv_struct(sock, sockets.HELLO)
        except (OSError, ConnectionError):
            sock.close()
            return
        with self._lock:
            group = self._groups.get(uuid.UUID(bytes=group_id).hex) if magic == sockets.MAGIC else None
        if group is None or not isinstance(group, _SocketGroup):
            sock.close()
            return
        group.attach(sock)
