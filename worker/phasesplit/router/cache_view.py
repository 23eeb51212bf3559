"""`CacheView`: the router's view of one worker's prefix cache, kept from the worker's Load polls.

The poll's `PrefixCacheSummary` is a delta since the events the view has seen, or the whole set when
the worker resynchronises it (restarted, or the view fell behind its event log). Between polls the
view also counts the blocks a prompt the router just sent there will have left cached (`expect`):
the next turn of a conversation often arrives before the next poll. Such an expectation lasts until
a poll begun after it has answered, which reports the blocks as they really are."""

from __future__ import annotations

from collections.abc import Sequence

from phasesplit.prefix_hash import block_hashes
from phasesplit.v1 import worker_pb2 as pb


class CacheView:
    def __init__(self):
        self.epoch = ""
        self.sequence = 0
        self.held: set[int] = set()
        self._expected: dict[int, int] = {}   # block hash -> polls begun when it was expected

    def request(self) -> pb.LoadRequest:
        """The Load request that asks for the events after those this view has seen."""
        return pb.LoadRequest(cache_epoch=self.epoch, cache_sequence=self.sequence)

    def apply(self, summary: pb.PrefixCacheSummary, poll: int) -> None:
        """A poll's summary (poll: its number); expectations from before that poll began are dropped."""
        if summary.full or summary.epoch != self.epoch:
            self.held = set(summary.stored)
        else:
            self.held.update(summary.stored)
            self.held.difference_update(summary.removed)
        self.epoch, self.sequence = summary.epoch, summary.sequence
        self._expected = {h: begun for h, begun in self._expected.items() if begun >= poll}

    def clear(self) -> None:
        """The worker reports no cache (prefix caching off, or it did not answer)."""
        self.epoch, self.sequence = "", 0
        self.held.clear()
        self._expected.clear()

    def expect(self, hashes: Sequence[int], polls_begun: int) -> None:
        for block_hash in hashes:
            self._expected[block_hash] = polls_begun

    def forget(self, hashes: Sequence[int]) -> None:
        """Blocks the worker turned out not to hold: until a poll reports them again."""
        self.held.difference_update(hashes)
        for block_hash in hashes:
            self._expected.pop(block_hash, None)

    def cached_blocks(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of a prompt with these block hashes the worker holds."""
        count = 0
        for block_hash in hashes:
            if block_hash not in self.held and block_hash not in self._expected:
                break
            count += 1
        return count


class PromptHashes:
    """One prompt's block hashes, computed once per block size (`phasesplit.prefix_hash`, as the workers do)."""

    def __init__(self, token_ids: Sequence[int], cache_salt: str | None):
        self.token_ids, self.cache_salt = token_ids, cache_salt
        self._by_size: dict[int, list[int]] = {}

    def full(self, block_size: int) -> list[int]:
        """Every full block's: what a prompt phase leaves cached."""
        if block_size not in self._by_size:
            self._by_size[block_size] = block_hashes(self.token_ids, block_size, self.cache_salt)
        return self._by_size[block_size]

    def lookup(self, block_size: int) -> list[int]:
        """Those a worker may find cached: its last token is always computed, so not a block that holds it."""
        return self.full(block_size)[: (len(self.token_ids) - 1) // block_size]
