"""A prefix cache of KV blocks, least recently used first out, keyed by chained block hashes.

A block hash stands for a prompt's first k blocks (the Mooncake traces' `hash_ids`, or any chained
hash of 512-token blocks), so a prompt can reuse the longest run of its leading blocks that the
cache holds. A lookup that uses a prefix refreshes it leaf first, so that a prefix's first block is
always the most recent of its run and eviction takes the tails of prefixes before their heads.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


class PrefixCache:
    def __init__(self, capacity_blocks: int):
        if capacity_blocks < 0:
            raise ValueError(f"capacity_blocks: must be >= 0, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block: int) -> bool:
        return block in self._blocks

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` the cache holds (no change to the recency order)."""
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[int]) -> None:
        """Hold every block of `hashes` as just used, evicting the least recently used beyond capacity."""
        if not self.capacity_blocks:
            return
        blocks = self._blocks
        for h in reversed(hashes[:self.capacity_blocks]):
            blocks[h] = None
            blocks.move_to_end(h)
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)

    def touch(self, hashes: Sequence[int]) -> None:
        """Mark the leading held blocks of `hashes` as just used."""
        self.insert(hashes[:self.match(hashes)])


def cached_tokens(matched_blocks: int, prompt_tokens: int, block_tokens: int) -> int:
    """Prompt tokens a hit of `matched_blocks` saves: at least the last token is always computed."""
    return max(0, min(matched_blocks * block_tokens, prompt_tokens - 1))


def pooled_hit_ratio(prompts: Iterable[tuple[Sequence[int], int]], capacity_blocks: int,
                     block_tokens: int) -> float:
    """Cached prompt tokens over all prompt tokens for one LRU cache of `capacity_blocks` that sees
    every request in order: what a perfect router over the fleet's pooled KV memory could reach."""
    cache = PrefixCache(capacity_blocks)
    hit = total = 0
    for hashes, tokens in prompts:
        hit += cached_tokens(cache.match(hashes), tokens, block_tokens)
        total += tokens
        cache.insert(hashes)
    return hit / total if total else 0.0
