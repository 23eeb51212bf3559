"""Cache-aware routing (`cacheAware`) beside join-the-shortest-queue (`leastLoaded`), as pure functions.

The names are those of `spec.router.routing.policy`. The functions read the attributes of
`phasesplit.router.workers.WorkerState` and take the prefix a worker's cache holds as a callable
(`cached(worker)`: prompt tokens of this request it would not compute), so the router (its view:
`router.cache_view`, from the workers' polls) and the fleet simulator (its `PrefixCache`) run the
same choices. `CACHE_THRESHOLD` and `BALANCE_SLACK` are the defaults of `spec.router.routing`.

- A prompt or mixed worker: when some worker holds at least `CACHE_THRESHOLD` of the prompt (an
  earlier turn of its conversation ran there), among the workers within `BALANCE_SLACK` requests
  in flight of the least busy, the one that would finish this prompt first: the fewest pending
  prompt tokens plus this prompt's tokens its cache does not hold (Mooncake's TTFT-first choice,
  counted in tokens), then fewest requests in flight, most free blocks, turns. Otherwise (a new
  conversation, or one whose cache is gone) the pool's join-the-shortest-queue pick, so that a
  short prefix every request shares (a system prompt) does not pile new conversations onto the
  machines that saw it first (SGLang's cache threshold and balance guard).
- A token worker: of those with room for the request (`lending.has_room`), the one holding the
  most of its prompt when that is at least half of it (an earlier turn of its conversation ran
  there), so the handoff moves fewer blocks; otherwise the join-the-shortest-queue pick.
- Conditional disaggregation (off unless `local_prefill_tokens` > 0): when the chosen token worker
  would compute at most that many of the prompt's tokens, it prefills the request itself and
  nothing moves. Off by default: the router does not do it, and a token worker that prefills
  pauses its decodes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from phasesplit.router.lending import has_room
from phasesplit.router.scheduling import pick_token_worker

W = TypeVar("W")
CACHE_AWARE, LEAST_LOADED = "cacheAware", "leastLoaded"
POLICIES = (CACHE_AWARE, LEAST_LOADED)
LOCAL_PREFILL_TOKENS = 0   # conditional disaggregation: prompts this short after the hit stay local (0: never)
BALANCE_SLACK = 8          # requests in flight above the least busy worker that still count as balanced
CACHE_THRESHOLD = 0.5      # share of the prompt a worker must hold for the cache to steer the pick


@dataclass(frozen=True)
class RoutingSettings:
    """The router's choice of workers (`spec.router.routing`)."""

    policy: str = CACHE_AWARE
    cache_threshold: float = CACHE_THRESHOLD
    balance_slack: int = BALANCE_SLACK
    local_prefill_tokens: int = LOCAL_PREFILL_TOKENS

    @property
    def cache_aware(self) -> bool:
        return self.policy == CACHE_AWARE


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"--routing: {policy!r} is not one of {', '.join(POLICIES)}")
    return policy


def pick_cache_aware(workers: Iterable[W], cached: Callable[[W], int], num_tokens: int,
                     least_loaded: Callable[..., W | None], exclude: Iterable[str] = (),
                     threshold: float = CACHE_THRESHOLD, slack: int = BALANCE_SLACK) -> W | None:
    """The prompt (or mixed) worker that would finish this `num_tokens`-token prompt first, where the
    cache matters; else `least_loaded` (the pool's join-the-shortest-queue pick)."""
    excluded = set(exclude)
    candidates = [w for w in workers if w.routable and w.address not in excluded]
    if not any(cached(w) > 0 and cached(w) >= threshold * num_tokens for w in candidates):
        return least_loaded(candidates)
    least = min((w.inflight for w in candidates), default=0)
    candidates = [w for w in candidates if w.inflight <= least + slack]
    return min(candidates, key=lambda w: (w.queued_prompt_tokens + num_tokens - cached(w), w.inflight,
                                          -w.free_blocks, w.last_picked), default=None)


def pick_cache_aware_token(workers: Iterable[W], cached: Callable[[W], int], num_tokens: int,
                           exclude: Iterable[str] = (), threshold: float = CACHE_THRESHOLD) -> W | None:
    """The token worker holding most of the prompt (at least `CACHE_THRESHOLD`), else join-the-shortest-queue."""
    excluded = set(exclude)
    roomy = [w for w in workers if w.routable and w.address not in excluded and has_room(w, num_tokens)]
    held = [(cached(w), w) for w in roomy]
    best = max((c for c, _ in held), default=0)
    if best >= threshold * num_tokens and best > 0:
        return min((w for c, w in held if c == best), key=lambda w: (w.inflight, -w.free_blocks, w.last_picked))
    return pick_token_worker(workers, exclude, num_tokens)


def prefill_locally(cached_on_token_worker: int, num_tokens: int,
                    local_prefill_tokens: int = LOCAL_PREFILL_TOKENS) -> bool:
    """Conditional disaggregation: the token worker prefills when little of the prompt is left to compute."""
    return local_prefill_tokens > 0 and num_tokens - cached_on_token_worker <= local_prefill_tokens
