"""Request ids aborted recently, so that what arrives for them afterwards can be refused.

Bounded in size and in time: an id is forgotten `ttl` seconds after its abort, or earlier when
`max_size` newer ones push it out. Not thread safe: the caller holds its own lock."""

from __future__ import annotations

import time
from collections import OrderedDict


class Tombstones:
    def __init__(self, ttl: float, max_size: int = 65536, clock=time.monotonic):
        if not ttl > 0:
            raise ValueError(f"ttl must be > 0 seconds, got {ttl}")
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.ttl, self.max_size, self._clock = ttl, max_size, clock
        self._expiry: OrderedDict[str, float] = OrderedDict()  # request id -> when it is forgotten, oldest first

    def add(self, request_id: str) -> None:
        self._expiry.pop(request_id, None)
        self._expiry[request_id] = self._clock() + self.ttl
        while len(self._expiry) > self.max_size:
            self._expiry.popitem(last=False)

    def __contains__(self, request_id: str) -> bool:
        self.prune()
        return request_id in self._expiry

    def __len__(self) -> int:
        self.prune()
        return len(self._expiry)

    def prune(self) -> None:
        now = self._clock()
        while self._expiry and next(iter(self._expiry.values())) <= now:
            self._expiry.popitem(last=False)
