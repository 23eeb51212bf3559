"""The batching rules, as pure functions: the engine's scheduler and the fleet simulator both call them."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def take_prefill(waiting: deque[T], token_budget: int, free_slots: int, num_tokens: Callable[[T], int],
                 admit: Callable[[T], bool]) -> list[T]:
    """The next prefill batch, first come first served: from the head of `waiting` while the batch
    stays within `token_budget` prompt tokens and `free_slots` sequences, and `admit` (the KV check,
    which reserves on success) accepts. A prompt larger than the whole budget still runs, alone."""
    batch: list[T] = []
    tokens = 0
    while waiting and len(batch) < free_slots:
        item = waiting[0]
        n = num_tokens(item)
        if batch and tokens + n > token_budget:
            break
        if not admit(item):
            break
        batch.append(waiting.popleft())
        tokens += n
    return batch


def take_ready(ready: deque[T], num_running: int, max_num_seqs: int) -> list[T]:
    """Sequences whose KV has arrived join the decode batch (continuous batching) while it has room."""
    joining = []
    while ready and num_running + len(joining) < max_num_seqs:
        joining.append(ready.popleft())
    return joining


def take_chunks(started: list[T], waiting: deque[T], token_budget: int, free_slots: int,
                num_tokens: Callable[[T], int], admit: Callable[[T], bool],
                splittable: Callable[[T], bool], unit: Callable[[T], int] = lambda item: 1) -> list[tuple[T, int]]:
    """Prompt chunks for a step whose decodes are taken already (stall-free batching): prompts begun
    in earlier steps go on first, then waiting ones join first come first served while `free_slots`
    allow and `admit` (the KV check, which reserves on success) accepts. Each takes as many of its
    `num_tokens` still to compute as `token_budget` has left; a chunk that does not end its prompt
    is a multiple of the prompt's `unit` tokens (a prompt worker's chunks end on block boundaries,
    so each chunk's KV moves as whole blocks). A prompt that is not `splittable` runs whole: when it
    fits, or as the step's first prompt."""
    chunks: list[tuple[T, int]] = []
    budget = token_budget
    for item in started:
        n = _chunk(num_tokens(item), budget, unit(item))
        if n == 0:
            break
        chunks.append((item, n))
        budget -= n
    while waiting and free_slots > 0 and budget > 0:
        item = waiting[0]
        n = num_tokens(item)
        if splittable(item):
            n = _chunk(n, budget, unit(item))
            if n == 0:
                break
        elif n > budget and chunks:
            break
        if not admit(item):
            break
        chunks.append((waiting.popleft(), n))
        budget -= n
        free_slots -= 1
    return chunks


def _chunk(num_tokens: int, budget: int, unit: int) -> int:
    """What a step computes of a prompt with `num_tokens` left: all of them when they fit, else the
    largest multiple of `unit` within the budget (0: none this step)."""
    if num_tokens <= budget:
        return max(num_tokens, 0) if budget > 0 else 0
    return budget // unit * unit
