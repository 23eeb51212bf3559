"""Requests held while no route can serve them: a pool scaled to zero (or whose workers are starting)
gets them once a worker is ready. The queue is bounded in size and in wait; while a request waits, it
counts in the waiting pools' queue and in-flight gauges, which is the demand that scales a pool from zero."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from phasesplit.router.metrics import RouterMetrics
from phasesplit.router.openai_api import unavailable
from phasesplit.router.pools import ROUTE_POOLS, Pools


@dataclass(frozen=True)
class QueueSettings:
    size: int = 256          # requests that may wait at once; 0: none wait (503 at once)
    timeout: float = 120.0   # seconds one request may wait for a worker


class EmptyPoolQueue:
    def __init__(self, pools: Pools, metrics: RouterMetrics, settings: QueueSettings):
        self.pools, self.metrics, self.settings = pools, metrics, settings
        self.waiting = 0

    def accepts(self) -> bool:
        return self.settings.size > 0 and self.pools.expected_route() is not None

    async def route(self, prompt_tokens: int, max_tokens: int) -> str:
        """The route to take now, or once one can serve; raises a 503 naming the pools it waited for."""
        route = self.pools.route()
        if route is not None:
            return route
        expected = self.pools.expected_route()
        if expected is None or self.settings.size <= 0:
            raise unavailable(self.pools.why_not())
        empty = [p for p in ROUTE_POOLS[expected] if not self.pools[p].routable()]
        named = " and ".join(f"the {p} pool" for p in empty)
        if self.waiting >= self.settings.size:
            raise unavailable(f"{named} has no ready worker and the queue for it is full "
                              f"({self.settings.size} requests wait); retry later")
        phases = self.metrics.demand(empty, prompt_tokens, max_tokens)
        self.waiting += 1
        try:
            return await asyncio.wait_for(self.pools.wait_for_route(), self.settings.timeout)
        except TimeoutError:
            raise unavailable(f"no worker of {named} became ready within {self.settings.timeout:g} s "
                              f"(scaled to zero, or its workers are starting): {self.pools.why_not()}") from None
        finally:
            self.waiting -= 1
            for phase in phases:
                phase.close()
