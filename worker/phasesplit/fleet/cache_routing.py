"""Cache-aware routing (`cacheAware`) beside join-the-shortest-queue (`leastLoaded`), as pure functions.

The names are those of `spec.router.routing.policy`. The functions read the attributes of
`phasesplit.router.workers.WorkerState` and take the prefix a worker's cache holds as a callable
(`cached(worker)`: prompt tokens of this request it would not compute), so the router and the
fleet simulator can both call them, each with its own view of the workers' caches.

- A prompt or mixed worker: the one that would finish this prompt first, i.e. the fewest pending
  prompt tokens plus this prompt's tokens its cache does not hold (Mooncake's TTFT-first choice,
  counted in tokens); then fewest requests in flight, most free blocks, turns.
- A token worker: of those with room for the request (`lending.has_room`), the one holding the
  most of its prompt when that is at least half of it (an earlier turn of its conversation ran
  there), so the handoff moves fewer blocks; otherwise the join-the-shortest-queue pick.
- Conditional disaggregation: when the chosen token worker would compute at most
  `local_prefill_tokens` of the prompt, it prefills the request itself and nothing moves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from phasesplit.router.lending import has_room
from phasesplit.router.scheduling import pick_token_worker

W = TypeVar("W")
CACHE_AWARE, LEAST_LOADED = "cacheAware", "leastLoaded"
POLICIES = (CACHE_AWARE, LEAST_LOADED)
LOCAL_PREFILL_TOKENS = 512   # conditional disaggregation: prompts this short after the hit stay local


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"--routing: {policy!r} is not one of {', '.join(POLICIES)}")
    return policy


def pick_cache_aware(workers: Iterable[W], cached: Callable[[W], int], num_tokens: int,
                     exclude: Iterable[str] = ()) -> W | None:
    """The prompt (or mixed) worker that would finish this `num_tokens`-token prompt first."""
    excluded = set(exclude)
    candidates = [w for w in workers if w.routable and w.address not in excluded]
    return min(candidates, key=lambda w: (w.queued_prompt_tokens + num_tokens - cached(w), w.inflight,
                                          -w.free_blocks, w.last_picked), default=None)


def pick_cache_aware_token(workers: Iterable[W], cached: Callable[[W], int], num_tokens: int,
                           exclude: Iterable[str] = ()) -> W | None:
    """The token worker holding most of the prompt (at least half), else join-the-shortest-queue."""
    excluded = set(exclude)
    roomy = [w for w in workers if w.routable and w.address not in excluded and has_room(w, num_tokens)]
    held = [(cached(w), w) for w in roomy]
    best = max((c for c, _ in held), default=0)
    if best * 2 >= num_tokens and best > 0:
        return min((w for c, w in held if c == best), key=lambda w: (w.inflight, -w.free_blocks, w.last_picked))
    return pick_token_worker(workers, exclude, num_tokens)


def prefill_locally(cached_on_token_worker: int, num_tokens: int,
                    local_prefill_tokens: int = LOCAL_PREFILL_TOKENS) -> bool:
    """Conditional disaggregation: the token worker prefills when little of the prompt is left to compute."""
    return num_tokens - cached_on_token_worker <= local_prefill_tokens
