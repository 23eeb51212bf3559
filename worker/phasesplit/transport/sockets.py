"""The tcp backend's data path: frames of KV bytes over one plain TCP connection per worker pair.

A connection starts with HELLO (magic, the pair's group id). Then the prompt worker sends frames:
FRAME (transfer id, layer, first block, number of blocks, op), for DATA frames followed by the K
then the V bytes of those blocks of the layer ([num_blocks, block_size, kv_heads, head_dim] each:
a layer comes whole, or in pieces when the prefill was chunked) and a TRAILER
with the CRC32C of each. The bytes go from the sender's cache blocks (`sendmsg` over views of
them) into the receiver's reserved blocks (`recv_into` views of them) with no copy in between;
each piece is checksummed right next to its send or receive, while it is still in the CPU cache.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable

import crc32c

MAGIC = b"PSKV1\0\0\0"
HELLO = struct.Struct("<8s16s")      # MAGIC, group id (uuid bytes)
FRAME = struct.Struct("<QIIII")      # transfer id, layer, first block, num_blocks, op (kv_group.DATA / ABORT / CLOSE)
TRAILER = struct.Struct("<II")       # CRC32C of the K bytes, of the V bytes
PIECE = 256 << 10                    # checksummed and sent (or received) per piece: stays in the CPU cache
_MAX_IOV = 64


def pieces(views: Iterable[memoryview], size: int = PIECE) -> Iterable[memoryview]:
    """The views cut into slices of at most `size` bytes."""
    for view in views:
        for pos in range(0, len(view), size):
            yield view[pos:pos + size]


def send_views(sock: socket.socket, views: Iterable[memoryview]) -> int:
    """Send every byte of `views` in order; the CRC32C of them."""
    crc = 0
    batch: list[memoryview] = []
    for piece in pieces(views):
        crc = crc32c.crc32c(piece, crc)
        batch.append(piece)
        if len(batch) == _MAX_IOV or sum(len(p) for p in batch) >= 4 * PIECE:
            _sendmsg_all(sock, batch)
            batch = []
    if batch:
        _sendmsg_all(sock, batch)
    return crc


def _sendmsg_all(sock: socket.socket, views: list[memoryview]) -> None:
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]


def recv_views(sock: socket.socket, views: Iterable[memoryview]) -> int:
    """Fill `views` in order from the socket; the CRC32C of what arrived. ConnectionError when it closes."""
    crc = 0
    for piece in pieces(views):
        got = 0
        while got < len(piece):
            n = sock.recv_into(piece[got:])
            if not n:
                raise ConnectionError("the peer closed the KV connection")
            got += n
        crc = crc32c.crc32c(piece, crc)
    return crc


def recv_struct(sock: socket.socket, fmt: struct.Struct) -> tuple:
    buf = bytearray(fmt.size)
    recv_views(sock, [memoryview(buf)])
    return fmt.unpack(buf)


def skip(sock: socket.socket, nbytes: int, scratch: bytearray) -> None:
    """Read and drop `nbytes` (a frame nobody takes any more): the connection stays in step."""
    view = memoryview(scratch)
    while nbytes:
        n = min(nbytes, len(view))
        recv_views(sock, [view[:n]])
        nbytes -= n


def tune(sock: socket.socket, timeout: float) -> socket.socket:
    sock.settimeout(timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
