"""`BlockManager`: the block tables of the paged KV cache, with automatic prefix caching.

Blocks are allocated so that a sequence's blocks stay consecutive where they can (attention reads a
run of consecutive blocks as one view): a new sequence goes to the middle of the largest free
stretch, leaving room on both sides for its neighbours to grow into, and a growing sequence takes
the block after its last when it is free.

With prefix caching (as vLLM v1 and nano-vllm do it) every full block whose KV a step has written is
registered under its chained hash (`phasesplit.prefix_hash`). A new sequence starts from the longest
run of its leading blocks found there, shared by reference count, and computes only the rest (at
least its last token). A block nobody holds stays cached, and is evicted, least recently freed first
(a finished sequence's last blocks before its first), only when fresh blocks run out."""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy

from phasesplit.engine.cache_events import CacheEvents
from phasesplit.prefix_hash import block_hashes

if TYPE_CHECKING:
    from phasesplit.engine.sequence import Sequence


class KVCapacityError(RuntimeError):
    """The cache has too few free blocks for the request."""


class CachedPrefixGone(LookupError):
    """Blocks a caller counted on finding in the prefix cache are no longer there (evicted)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.ref_count = numpy.zeros(num_blocks, dtype=numpy.int64)
        self.is_free = numpy.ones(num_blocks, dtype=bool)  # held by nobody (it may still be cached)
        self.is_cached = numpy.zeros(num_blocks, dtype=bool)  # registered under a hash
        self.num_free_blocks = num_blocks
        self.hash_of_block: dict[int, int] = {}
        self.block_of_hash: dict[int, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # free cached blocks, the next to evict first
        self.num_evicted = 0  # blocks evicted so far: until the next, every cached prefix only grows
        self.events = CacheEvents()  # what the cache holds, as the router learns it

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self.hash_of_block)

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # ---- the prefix cache ----

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks `seq` can start from: its leading full blocks found by hash, short of its
        last token (which is always computed, to give the next token's logits)."""
        if not self.prefix_caching:
            return []
        hashes = self.hashes(seq)[: (seq.num_tokens - 1) // self.block_size]
        blocks = []
        for block_hash in hashes:
            block = self.block_of_hash.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def num_cached_prefix_tokens(self, seq: Sequence) -> int:
        """`len(cached_prefix(seq)) * block_size`, walked on from where the last call on `seq` stopped
        unless a block was evicted since (a waiting queue is counted after every step)."""
        if not self.prefix_caching:
            return 0
        evicted, found = seq.cached_prefix_probe
        if evicted != self.num_evicted:
            found = 0
        hashes, lookable = self.hashes(seq), (seq.num_tokens - 1) // self.block_size
        while found < lookable and hashes[found] in self.block_of_hash:
            found += 1
        seq.cached_prefix_probe = (self.num_evicted, found)
        return found * self.block_size

    def hashes(self, seq: Sequence) -> list[int]:
        """The hashes of `seq`'s full blocks (kept on it: its tokens only grow)."""
        if len(seq.block_hashes) < seq.num_tokens // self.block_size:
            seq.block_hashes = block_hashes(seq.token_ids, self.block_size, seq.params.cache_salt, seq.block_hashes)
        return seq.block_hashes

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks of `seq` that its computed tokens fill (after the step that wrote them).
        A block whose hash another block holds already stays private."""
        if not self.prefix_caching:
            return
        num_full = seq.num_cached_tokens // self.block_size
        hashes = self.hashes(seq)
        for i in range(seq.num_registered_blocks, num_full):
            block, block_hash = seq.block_table[i], hashes[i]
            if block_hash not in self.block_of_hash and block not in self.hash_of_block:
                self.block_of_hash[block_hash] = block
                self.hash_of_block[block] = block_hash
                self.is_cached[block] = True
                self.events.stored(block_hash)
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)

    def _evict(self, n: int) -> None:
        for _ in range(n):
            block, _ = self.evictable.popitem(last=False)
            self.num_evicted += 1
            block_hash = self.hash_of_block.pop(block)
            del self.block_of_hash[block_hash]
            self.is_cached[block] = False
            self.events.removed(block_hash)

    # ---- sequences ----

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self.cached_prefix(seq)
        reused_free = int(self.is_free[hits].sum()) if hits else 0
        return self.blocks_for(seq.num_tokens) - len(hits) + reused_free <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Blocks for all of `seq`'s tokens: its cached prefix shared, fresh blocks for the rest.
        Sets `seq.num_cached_tokens` to the tokens the cache already holds."""
        assert not seq.block_table, f"{seq.request_id} already holds blocks"
        hits = self.cached_prefix(seq)
        seq.block_table = self._share_then_take(hits, self.blocks_for(seq.num_tokens))
        seq.num_registered_blocks = len(hits)
        seq.num_cached_tokens = len(hits) * self.block_size

    def take_with_prefix(self, hashes: list[int], n: int) -> list[int]:
        """`n` blocks whose first ones are the cached blocks of `hashes` (shared: one more reference each),
        the rest fresh. Raises CachedPrefixGone when the cache no longer holds every one of `hashes`."""
        cached = [self.block_of_hash.get(h) for h in hashes]
        if None in cached:
            raise CachedPrefixGone(f"{cached.count(None)} of the {len(hashes)} leading blocks are no longer cached")
        return self._share_then_take(cached, n)

    def _share_then_take(self, cached: list[int], n: int) -> list[int]:
        """`n` blocks: the `cached` ones shared (one more reference each), then fresh ones after them."""
        for block in cached:
            self._hold(block)
        try:
            return cached + self.take(n - len(cached), after=cached[-1] if cached else None)
        except KVCapacityError:
            self.free(cached)
            raise

    def _hold(self, block: int) -> None:
        if self.ref_count[block] == 0:
            self.evictable.pop(block, None)
            self.is_free[block] = False
            self.num_free_blocks -= 1
        self.ref_count[block] += 1

    def deallocate(self, seq: Sequence) -> None:
        self.free(seq.block_table)
        seq.block_table = []
        seq.num_registered_blocks = 0

    def can_append(self, seq: Sequence) -> bool:
        """Whether the token about to be computed for `seq` has a slot (a new block may be needed)."""
        return len(seq.block_table) >= self.blocks_for(seq.num_tokens) or self.num_free_blocks > 0

    def may_append(self, seq: Sequence) -> None:
        if len(seq.block_table) < self.blocks_for(seq.num_tokens):
            seq.block_table.extend(self.take(1, after=seq.block_table[-1] if seq.block_table else None))

    # ---- blocks ----

    def take(self, n: int, after: int | None = None) -> list[int]:
        """`n` blocks of their own (not cached), as few runs as the free stretches allow, the ones after
        block `after` first when they are free. Cached free blocks are evicted only when too few others
        are free."""
        if n == 0:
            return []
        if n > self.num_free_blocks:
            raise KVCapacityError(f"need {n} KV blocks, {self.num_free_blocks} free of {self.num_blocks}")
        self._evict(max(0, n - (self.num_free_blocks - len(self.evictable))))
        ids = self.pick_fresh(n, after)
        self.ref_count[ids] = 1
        self.is_free[ids] = False
        self.num_free_blocks -= n
        return ids

    def pick_fresh(self, n: int, after: int | None) -> list[int]:
        """`n` free blocks that are not cached (there are enough)."""
        if after is not None and after + n < self.num_blocks:
            following = slice(after + 1, after + 1 + n)
            if (self.is_free[following] & ~self.is_cached[following]).all():
                return list(range(after + 1, after + 1 + n))
        return _from_stretches(self.is_free & ~self.is_cached, n)

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block (taken by `take` or held in a block table). The last
        block of the list is the first to be evicted once nobody holds it."""
        assert (self.ref_count[block_ids] > 0).all(), f"blocks freed twice: {block_ids}"
        for block in reversed(block_ids):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.is_free[block] = True
                self.num_free_blocks += 1
                if block in self.hash_of_block:
                    self.evictable[block] = None


def _from_stretches(fresh: numpy.ndarray, n: int) -> list[int]:
    """`n` of the blocks `fresh` marks, from the largest runs first, each from its run's middle."""
    edges = numpy.flatnonzero(numpy.diff(fresh, prepend=False, append=False))
    starts, lengths = edges[0::2], edges[1::2] - edges[0::2]
    ids: list[int] = []
    for i in numpy.argsort(-lengths, kind="stable"):
        take = min(int(lengths[i]), n - len(ids))
        first = int(starts[i]) + (int(lengths[i]) - take) // 2
        ids.extend(range(first, first + take))
        if len(ids) == n:
            return ids
    raise AssertionError("fewer free blocks than counted")
