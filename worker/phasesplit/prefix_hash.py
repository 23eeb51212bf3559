"""Prefix-cache block hashes: one per full block of a token sequence, each chaining its parent's hash
with the block's token ids (and, in the first block only, the extra keys such as a request's
`cache_salt`), so that equal hashes mean equal prefixes. The workers' KV caches and the router compute
them with this one function; free of torch (the router imports it). 64-bit values (the handoff's
`block_hashes` are uint64), from SHA-256 so that they are the same in every process and version."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

HASH_NAME = "sha256-64"  # named in a layout check: both sides must hash the same way
MAX_CACHE_SALT_LENGTH = 1024


def valid_cache_salt(salt: object) -> bool:
    """A request's `cache_salt`: a non-empty string of at most MAX_CACHE_SALT_LENGTH characters."""
    return isinstance(salt, str) and 0 < len(salt) <= MAX_CACHE_SALT_LENGTH


def hash_block(parent: int | None, token_ids: Sequence[int], extra_keys: Sequence[str] = ()) -> int:
    """The hash of one block of `token_ids` after the block whose hash is `parent` (None: the first block)."""
    digest = hashlib.sha256()
    digest.update(b"\x00" if parent is None else b"\x01" + parent.to_bytes(8, "little"))
    for key in extra_keys:
        encoded = key.encode()
        digest.update(struct.pack("<I", len(encoded)) + encoded)
    digest.update(struct.pack(f"<I{len(token_ids)}I", len(token_ids), *token_ids))
    return int.from_bytes(digest.digest()[:8], "little")


def block_hashes(token_ids: Sequence[int], block_size: int, cache_salt: str | None = None,
                 start: Sequence[int] = ()) -> list[int]:
    """The hashes of every full block of `token_ids` (a trailing partial block has none). `start`: hashes
    already computed for its first blocks, which are kept (a growing sequence extends its own)."""
    hashes = list(start)
    for first in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hashes[-1] if hashes else None
        extra = (cache_salt,) if parent is None and cache_salt else ()
        hashes.append(hash_block(parent, token_ids[first:first + block_size], extra))
    return hashes
