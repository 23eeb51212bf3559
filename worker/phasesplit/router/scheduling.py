"""Join-the-shortest-queue: which worker of a pool gets the next request.

The pick functions only choose; whoever sends the request records the pick in its `Turns`, so that
equal workers take turns (least recently picked first). Each router and each simulation keeps its own.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import TypeVar

from phasesplit.router.workers import WorkerState

W = TypeVar("W")


class Turns:
    """The order in which equal workers take turns: each pick stamps the worker with the next number."""

    def __init__(self):
        self._picks = itertools.count(1)

    def take(self, worker: W | None) -> W | None:
        if worker is not None:
            worker.last_picked = next(self._picks)
        return worker


def pick_prompt_worker(workers: Iterable[WorkerState], exclude: Iterable[str] = ()) -> WorkerState | None:
    """Fewest pending prompt tokens (the router's own and the worker's polled queue)."""
    candidates = _candidates(workers, exclude)
    return min(candidates, key=lambda w: (w.queued_prompt_tokens, w.inflight, w.last_picked), default=None)


def pick_token_worker(workers: Iterable[WorkerState], exclude: Iterable[str] = (), tokens: int = 1
                      ) -> WorkerState | None:
    """Of the workers with room for the KV of `tokens` tokens (polled, less the router's reservations): fewest of
    this router's requests in flight, then most free blocks. Counting its own assignments keeps a burst
    spread while the polled load still lags behind it. With no room anywhere: most free blocks."""
    candidates = _candidates(workers, exclude)
    roomy = [w for w in candidates if w.free_blocks >= math.ceil(tokens / w.block_size)]
    if roomy:
        return min(roomy, key=lambda w: (w.inflight, -w.free_blocks, w.last_picked))
    return min(candidates, key=lambda w: (-w.free_blocks, w.inflight, w.last_picked), default=None)


def pick_mixed_worker(workers: Iterable[WorkerState], exclude: Iterable[str] = ()) -> WorkerState | None:
    """Fewest pending prompt tokens, then fewest requests in flight, then most free KV blocks."""
    candidates = _candidates(workers, exclude)
    return min(candidates, key=lambda w: (w.queued_prompt_tokens, w.inflight, -w.free_blocks, w.last_picked),
               default=None)


def _candidates(workers: Iterable[WorkerState], exclude: Iterable[str]) -> list[WorkerState]:
    excluded = set(exclude)
    return [w for w in workers if w.routable and w.address not in excluded]
