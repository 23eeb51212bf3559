"""`CacheEvents`: the block hashes a worker's prefix cache holds, told to the router on its Load poll.

Each block registered (stored) or evicted (removed) is an event with the next sequence number; the
last `LOG_SIZE` events are kept. A poll names the epoch and sequence number the router has seen and
gets the events after it; a router of another epoch (the worker restarted) or one further behind than
the log reaches gets the whole set instead (a resync). Bounded either way: a delta holds at most
`LOG_SIZE` events, a resync one hash per KV block. Thread-safe: the engine thread records, the gRPC
threads read."""

from __future__ import annotations

import dataclasses
import secrets
import threading
from collections import deque

LOG_SIZE = 8192  # events kept for deltas; a router further behind resyncs
STORED, REMOVED = True, False


@dataclasses.dataclass(frozen=True, slots=True)
class CacheSummary:
    epoch: str
    sequence: int  # the events up to this one are included
    full: bool  # `stored` is the whole set (a resync), not a delta
    stored: list[int]
    removed: list[int]


class CacheEvents:
    def __init__(self, log_size: int = LOG_SIZE):
        self.epoch = secrets.token_hex(8)
        self.sequence = 0
        self._held: set[int] = set()
        self._log: deque[tuple[int, bool, int]] = deque(maxlen=log_size)  # (sequence, stored?, hash)
        self._lock = threading.Lock()

    def stored(self, block_hash: int) -> None:
        self._record(STORED, block_hash)

    def removed(self, block_hash: int) -> None:
        self._record(REMOVED, block_hash)

    def _record(self, kind: bool, block_hash: int) -> None:
        with self._lock:
            self.sequence += 1
            self._log.append((self.sequence, kind, block_hash))
            (self._held.add if kind is STORED else self._held.discard)(block_hash)

    def since(self, epoch: str, sequence: int) -> CacheSummary:
        """What a router that has seen this worker's events up to `sequence` of `epoch` needs."""
        with self._lock:
            oldest = self._log[0][0] if self._log else self.sequence + 1
            if epoch != self.epoch or sequence > self.sequence or sequence + 1 < oldest:
                return CacheSummary(self.epoch, self.sequence, True, list(self._held), [])
            last = {h: kind for number, kind, h in self._log if number > sequence}   # the net effect per hash
            current = self.sequence
        return CacheSummary(self.epoch, current, False, [h for h, kind in last.items() if kind is STORED],
                            [h for h, kind in last.items() if kind is REMOVED])
