"""The token worker's side of tcp transfers: pairs join over a TCP port this worker listens on.

The control service is `pair_receive.KVGroupService`; here each pair's link is the TCP connection
the prompt worker opens to `port` after `Connect` (its HELLO names the group). The link's thread
reads frames (see `sockets`) and receives each layer's K and V straight into the transfer's
reserved blocks (`KVDestination.receive`), checking the CRC32C of each. A frame for a transfer
that already ended, or that fails its checksum, is read to its end and dropped (the latter fails
its transfer), so the connection stays usable; a connection that breaks fails only its transfers.
"""

from __future__ import annotations

import socket
import threading
import uuid

import torch

from phasesplit.transport import kv_group, sockets
from phasesplit.transport.backends import TIMEOUT
from phasesplit.transport.base import K, V, KVDataLoss, KVSink, TransferAborted, TransferError
from phasesplit.transport.layout import KVLayout, as_layout
from phasesplit.transport.pair_receive import IDLE_TIMEOUT, Group, Incoming, KVGroupService, check_options
from phasesplit.v1 import worker_pb2 as pb

_SCRATCH = 1 << 20
MAX_UNNAMED_CONNECTIONS = 64  # accepted, HELLO not read yet: each holds a thread until its HELLO or timeout


class SocketListener:
    """The KV port: accepts prompt workers' connections and hands each to the link its HELLO names."""

    backend = "tcp"

    def __init__(self, port: int, layout: KVLayout, timeout: float, idle_timeout: float, host: str = ""):
        self.frame_bytes = layout.block_bytes
        self._unnamed = threading.BoundedSemaphore(MAX_UNNAMED_CONNECTIONS)
        self.timeout, self.idle_timeout = timeout, idle_timeout
        self._links: dict[str, SocketReceiveLink] = {}  # by group id, until their connection arrives
        self._lock = threading.Lock()
        try:
            self.sock = _listen(host, port)
        except OSError as exc:
            raise OSError(f"cannot listen for KV on port {port}: {exc}") from exc
        self._acceptor = threading.Thread(target=self._accept, name="kv-tcp-accept", daemon=True)
        self._acceptor.start()

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def link(self, group_id: str, bind_host: str) -> SocketReceiveLink:
        with self._lock:
            link = self._links[group_id] = SocketReceiveLink(self, group_id)
        return link

    def forget(self, link: SocketReceiveLink) -> None:
        with self._lock:
            if self._links.get(link.group_id) is link:
                del self._links[link.group_id]

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._acceptor.join(self.timeout)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except OSError:  # closed
                return
            if not self._unnamed.acquire(blocking=False):
                sock.close()  # too many connections that named no group yet
                continue
            threading.Thread(target=self._hello_once, args=(sock,), name="kv-tcp-hello", daemon=True).start()

    def _hello_once(self, sock: socket.socket) -> None:
        try:
            self._hello(sock)
        finally:
            self._unnamed.release()

    def _hello(self, sock: socket.socket) -> None:
        try:
            sockets.tune(sock, self.timeout)
            magic, group_id = sockets.recv_struct(sock, sockets.HELLO)
        except (OSError, ConnectionError):
            sock.close()
            return
        with self._lock:
            link = self._links.pop(uuid.UUID(bytes=group_id).hex, None) if magic == sockets.MAGIC else None
        if link is None:
            sock.close()
            return
        link.attach(sock)


def _listen(host: str, port: int) -> socket.socket:
    """The KV port on the worker's address; on every interface when `host` is a wildcard."""
    if not kv_group.is_wildcard(host):
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    if socket.has_dualstack_ipv6():
        return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
    return socket.create_server(("0.0.0.0", port))


class SocketReceiveLink:
    """This side of one pair's TCP connection."""

    def __init__(self, listener: SocketListener, group_id: str):
        self._listener = listener
        self.group_id = group_id
        self._arrived = threading.Event()
        self._sock: socket.socket | None = None

    def attach(self, sock: socket.socket) -> None:
        self._sock = sock
        self._arrived.set()

    def join(self) -> None:
        timeout = self._listener.timeout
        if not self._arrived.wait(timeout):
            raise kv_group.GroupBroken(f"no KV connection for group {self.group_id} within {timeout:g} s")

    def discard(self) -> None:
        self._listener.forget(self)
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def receive(self, group: Group) -> None:
        try:
            self._frames(group, self._sock)
        except (OSError, ValueError) as exc:  # closed, reset, timed out
            raise kv_group.GroupBroken(f"KV connection failed: {exc}") from exc

    def _frames(self, group: Group, sock: socket.socket) -> None:
        scratch = bytearray(_SCRATCH)
        while True:
            sock.settimeout(self._listener.idle_timeout)
            transfer_id, layer, first, num_blocks, op = sockets.recv_struct(sock, sockets.FRAME)
            sock.settimeout(self._listener.timeout)
            incoming = group.incoming(transfer_id)
            if op == kv_group.CLOSE:
                group.broken("the prompt worker closed the KV connection")
                return
            if op == kv_group.ABORT:
                if incoming is not None:
                    incoming.fail(TransferAborted("aborted by the prompt worker"))
                continue
            self._layer(sock, incoming, layer, first, num_blocks, scratch)

    def _layer(self, sock: socket.socket, incoming: Incoming | None, layer: int, first: int, num_blocks: int,
               scratch: bytearray) -> None:
        size = num_blocks * self._listener.frame_bytes
        taken = incoming is not None and incoming.accepts(layer, first, num_blocks)
        crcs = []
        for kind in (K, V):
            if taken:
                taken = _into_blocks(sock, incoming, layer, kind, first, num_blocks, crcs)
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
        incoming.stored(layer, num_blocks, 2 * size)


def _into_blocks(sock, incoming: Incoming, layer: int, kind: int, first: int, num_blocks: int, crcs: list) -> bool:
    """Receive one K or V into the destination's blocks; False when the destination refused them."""
    try:
        incoming.dest.receive(layer, kind, first, num_blocks,
                              lambda views: crcs.append(sockets.recv_views(sock, views)))
    except TransferError as exc:  # freed or aborted here meanwhile
        incoming.fail(TransferAborted(f"writing layer {layer} failed: {exc}"))
        return False
    return True


class TcpKVReceiver(KVGroupService):
    """Serves `KVGroup` for the tcp backend on a token worker; the KV bytes arrive on `port`."""

    def __init__(self, sink: KVSink, layout: KVLayout | pb.KVLayout, device: str | torch.device, *,
                 timeout: float = TIMEOUT, port: int = 0, idle_timeout: float = IDLE_TIMEOUT, host: str = ""):
        check_options(timeout, port)
        listener = SocketListener(port, as_layout(layout), timeout, idle_timeout, host)
        super().__init__(sink, layout, torch.device(device), listener, timeout=timeout)
