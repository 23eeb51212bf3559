"""Admission control: a request starts only when the workers' batches have room for it, and one that cannot
start within `max_queue_wait` (or finds `max_queue_length` requests already waiting) is refused with a 429
and `Retry-After`, as OpenAI's rate limits are. Requests that do start keep the latency of an unloaded
deployment, instead of all of them queueing on the workers without bound.

The room is the batch limit the workers report (`max_running_requests`, their `max_num_seqs`) summed over
the ready workers that decode for the current route (token and mixed workers on the split route, mixed on
the mixed route); a worker that reports none leaves the room unbounded, and so does a route gone (the
dispatcher answers that with its 503). Each router counts only its own requests, so `replicas` routers
in front of the same workers each admit their share of the room (rounded up): together no more than
the batches hold, as long as the clients' requests spread evenly over them (a Service's do). A request
admitted holds its place until it ends, across retries and migrations. While it waits it counts in the
queue gauges of the pool whose batches it waits for (token, or mixed), the demand the autoscaler reads,
as it would queued on a worker of that pool. Requests for a pool with no ready worker first wait in the
`EmptyPoolQueue` (scale-from-zero), under its own, longer bounds.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from phasesplit.router.metrics import RouterMetrics
from phasesplit.router.openai_api import APIError, rate_limited
from phasesplit.router.pools import Pools

DECODE_POOLS = {"split": ("token", "mixed"), "mixed": ("mixed",)}   # the mixed pool is lent to the split route
WAITS_FOR = {"split": ("token",), "mixed": ("mixed",)}   # the pool whose demand a waiting request is


@dataclass(frozen=True)
class AdmissionSettings:
    max_queue_wait: float = 30.0      # seconds a request may wait for room in a batch before a 429
    max_queue_length: int = 1024      # requests that may wait at once; one more is a 429 at once
    max_streams_per_key: int = 1024   # requests one API key may have in flight (no key set: all clients together)
    replicas: int = 1                 # routers in front of the same workers, each admitting its share of the room


class Admission:
    def __init__(self, pools: Pools, metrics: RouterMetrics, settings: AdmissionSettings):
        self.pools, self.metrics, self.settings = pools, metrics, settings
        self.running = 0   # requests admitted and not finished
        self._waiting: deque[asyncio.Future] = deque()   # turns in arrival order
        pools.listeners.append(self._hand_out)   # a poll may show more room

    def room(self) -> int | None:
        """Requests the ready decoding workers' batches hold (None: unbounded)."""
        route = self.pools.route()
        if route is None:
            return None
        workers = [w for pool in DECODE_POOLS[route] for w in self.pools[pool].routable()]
        if any(not w.max_batch for w in workers):
            return None
        return -(-sum(w.max_batch for w in workers) // self.settings.replicas)

    def _has_room(self) -> bool:
        room = self.room()
        return room is None or self.running < room

    async def admit(self, route: str, prompt_tokens: int, max_tokens: int) -> Held:
        """A slot to hold while the request runs (`with slot:`), or a 429 when none frees in time."""
        if not self._waiting and self._has_room():
            self._take()
            self.metrics.admission_wait.observe(0.0)
            return Held(self.release)
        self.refuse_if_full()
        await self._wait_turn(route, prompt_tokens, max_tokens)
        return Held(self.release)

    def refuse_if_full(self) -> None:
        """A 429 at once when `max_queue_length` requests already wait: the router calls it before it
        tokenizes a request too, so that the excess of a burst costs nothing but its refusal."""
        if len(self._waiting) >= self.settings.max_queue_length:
            raise self._refuse("queue_full", f"the router is at capacity and {len(self._waiting)} requests "
                                             "already wait to start (maxQueueLength); retry later")

    async def _wait_turn(self, route: str, prompt_tokens: int, max_tokens: int) -> None:
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        self._hand_out()   # the turns ahead may all be gone (their clients left)
        self.metrics.admission_waiting.inc()
        demand = self.metrics.demand(WAITS_FOR[route], prompt_tokens, max_tokens)
        start = time.monotonic()
        try:
            async with asyncio.timeout(self.settings.max_queue_wait):
                await turn
        except TimeoutError:
            if not _given(turn):
                raise self._refuse("queue_wait", f"the router is at capacity: the request could not start within "
                                                 f"{self.settings.max_queue_wait:g} s (maxQueueWaitSeconds); "
                                                 "retry later") from None
        except BaseException:   # the client went away, perhaps just as its turn came
            if _given(turn):
                self.release()
            raise
        finally:
            if not turn.done():
                turn.cancel()
            if turn in self._waiting:
                self._waiting.remove(turn)
            self.metrics.admission_waiting.dec()
            for phase in demand:
                phase.close()
        self.metrics.admission_wait.observe(time.monotonic() - start)

    def _take(self) -> None:
        self.running += 1
        self.metrics.admission_running.inc()

    def release(self) -> None:
        self.running -= 1
        self.metrics.admission_running.dec()
        self._hand_out()

    def _hand_out(self) -> None:
        """Gives the free room to the longest waiting requests."""
        while self._waiting and self._has_room():
            turn = self._waiting.popleft()
            if not turn.done():
                self._take()
                turn.set_result(None)

    def _refuse(self, reason: str, message: str) -> APIError:
        self.metrics.admission_refused.labels(reason=reason).inc()
        return rate_limited(message, retry_after=self.settings.max_queue_wait)


def _given(turn: asyncio.Future) -> bool:
    return turn.done() and not turn.cancelled()


class Held:
    """A place a request has taken, given back when the `with` block ends, on every path."""

    def __init__(self, give_back: Callable[[], None]):
        self.give_back = give_back

    def __enter__(self) -> "Held":
        return self

    def __exit__(self, *exc) -> bool:
        self.give_back()
        return False


class KeyStreams:
    """Requests in flight per API key, at most `limit` each (0: no limit)."""

    def __init__(self, limit: int, metrics: RouterMetrics):
        self.limit, self.metrics = limit, metrics
        self.held: Counter[str] = Counter()

    def take(self, key: str) -> Held:
        """One more request in flight on `key` (`with` it), or a 429 when the key has its limit already."""
        if self.limit and self.held[key] >= self.limit:
            self.metrics.admission_refused.labels(reason="key_limit").inc()
            raise rate_limited(f"this API key already has {self.held[key]} requests in flight, the most it may "
                               "have (maxStreamsPerKey); retry when one has finished", retry_after=1)
        self.held[key] += 1
        return Held(lambda: self._give_back(key))

    def _give_back(self, key: str) -> None:
        self.held[key] -= 1
        if not self.held[key]:
            del self.held[key]
