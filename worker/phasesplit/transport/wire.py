"""KVChunk on the wire, encoded and decoded by hand: the payload is copied once, never parsed.

The bytes are exactly what `phasesplit.v1.KVChunk.SerializeToString()` produces (fields in
number order, zero scalars omitted), so either side may use the generated class instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import crc32c

from phasesplit.transport.base import END
from phasesplit.v1 import worker_pb2 as pb

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_HEADER_FIELD, _DATA_FIELD = 1, 7
_SCALAR_FIELDS = {2: "layer", 3: "kind", 4: "block_start", 5: "block_count", 6: "checksum"}


class WireError(ValueError):
    """Bytes that are not a KVChunk."""


@dataclass(slots=True)
class Chunk:
    header: pb.KVHeader | None = None
    layer: int = 0
    kind: int = 0
    block_start: int = 0
    block_count: int = 0
    checksum: int = 0
    data: memoryview = memoryview(b"")


def checksum(pieces) -> int:
    """CRC32C over the concatenation of `pieces` (buffers), without concatenating them."""
    crc = 0
    for piece in pieces:
        crc = crc32c.crc32c(piece, crc)
    return crc


def copy_checked(data: memoryview, views: list[memoryview], piece: int = 256 << 10) -> int:
    """Copy `data` into `views` in order, piece by piece; the CRC32C of what was written, each
    piece checksummed right after its copy, while it is still in the CPU cache."""
    crc = pos = 0
    for view in views:
        for at in range(0, len(view), piece):
            n = min(piece, len(view) - at)
            target = view[at:at + n]
            target[:] = data[pos:pos + n]
            crc = crc32c.crc32c(target, crc)
            pos += n
    return crc


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_header(header: pb.KVHeader) -> bytes:
    return pb.KVChunk(header=header).SerializeToString()


def encode_end() -> bytes:
    """The last message of a complete stream. A stream that ends without it was cut off: a cancelled
    call can look like a half-closed one to the receiver's request iterator."""
    return pb.KVChunk(kind=END).SerializeToString()


def encode_data(layer: int, kind: int, block_start: int, block_count: int, pieces: list) -> bytes:
    """One data chunk whose payload is the concatenation of `pieces` (buffers): one copy."""
    size = sum(len(p) for p in pieces)
    prefix = bytearray()
    for number, value in ((2, layer), (3, kind), (4, block_start), (5, block_count), (6, checksum(pieces))):
        if value:
            prefix += _varint(number << 3 | _VARINT) + _varint(value)
    prefix += _varint(_DATA_FIELD << 3 | _LEN) + _varint(size)
    return b"".join([prefix, *pieces])


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint longer than 10 bytes")


def decode(raw) -> Chunk:
    """A KVChunk from its wire bytes (or a parsed KVChunk message); `data` is a view, not a copy."""
    if isinstance(raw, pb.KVChunk):
        return Chunk(raw.header if raw.HasField("header") else None, raw.layer, raw.kind,
                     raw.block_start, raw.block_count, raw.checksum, memoryview(raw.data))
    buf = memoryview(raw)
    chunk, pos = Chunk(), 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, pos = _read_varint(buf, pos)
            if number in _SCALAR_FIELDS:
                setattr(chunk, _SCALAR_FIELDS[number], value & 0xFFFFFFFF)
        elif wire_type == _LEN:
            size, pos = _read_varint(buf, pos)
            if pos + size > len(buf):
                raise WireError(f"field {number} runs past the end of the message")
            if number == _DATA_FIELD:
                chunk.data = buf[pos:pos + size]
            elif number == _HEADER_FIELD:
                chunk.header = pb.KVHeader.FromString(buf[pos:pos + size])
            pos += size
        elif wire_type in (_FIXED64, _FIXED32):
            pos += 8 if wire_type == _FIXED64 else 4
        else:
            raise WireError(f"unsupported wire type {wire_type} for field {number}")
    if pos != len(buf):
        raise WireError("truncated message")
    return chunk
