"""The mixed pool lends its workers to an overloaded split pool (Splitwise's mixed pool).

Pure functions over worker states: the router and the fleet simulator both call them. The mixed
workers join the candidates of the prompt pool when no prompt worker's queue is within
`LEND_QUEUE_TOKENS`, and of the token pool when no token worker has room for the request: free
KV blocks for its `num_tokens` and a free slot in its decode batch (where the worker reports its
batch limit, `max_batch`; `busy_slots` counts the requests it holds or has been sent);
join-the-shortest-queue then picks among all candidates.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

W = TypeVar("W")
LEND_QUEUE_TOKENS = 4096   # two prefill batches of the default budget


def prompt_candidates(prompt: Iterable[W], mixed: Iterable[W], queue_tokens: float = LEND_QUEUE_TOKENS) -> list[W]:
    own = list(prompt)
    if any(w.routable and w.queued_prompt_tokens <= queue_tokens for w in own):
        return own
    return own + list(mixed)


def token_candidates(token: Iterable[W], mixed: Iterable[W], num_tokens: int) -> list[W]:
    own = list(token)
    if any(w.routable and has_room(w, num_tokens) for w in own):
        return own
    return own + list(mixed)


def has_room(worker, num_tokens: int) -> bool:
    """KV for `num_tokens` and a free slot in the decode batch."""
    batch_full = bool(worker.max_batch) and worker.busy_slots >= worker.max_batch
    return worker.free_blocks * worker.block_size >= num_tokens and not batch_full
