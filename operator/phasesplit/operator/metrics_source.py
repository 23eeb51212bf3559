"""Where the operator's autoscaler reads pool metrics: the router's `/metrics`
(`phasesplit.control.router_metrics.RouterScrape`), or a Prometheus server (`PrometheusQuery`).
Both give the same `Snapshot`."""

from __future__ import annotations

import math

import aiohttp

from phasesplit.control.router_metrics import (POOL_GAUGES, QUANTILE, TBT, TIMEOUT, TTFT, WORKER_LOAD,
                                               MetricsUnavailable, Snapshot, pool_metrics)


def router_selector(namespace: str, service: str) -> str:
    """The label matchers that pick one SplitInference's router series in Prometheus: the labels a
    Prometheus Operator ServiceMonitor (or the usual `kubernetes-service-endpoints` scrape job)
    attaches for the router Service."""
    return f'namespace="{namespace}",service="{service}"'


def pool_query(metric: str, selector: str) -> str:
    agg = "avg" if metric == "kvUtilization" else "sum"
    return f"{agg} by (pool) ({POOL_GAUGES[metric]}{{{selector}}})"


def quantile_query(histogram: str, selector: str, window: str = "1m") -> str:
    return f"histogram_quantile({QUANTILE}, sum by (le) (rate({histogram}_bucket{{{selector}}}[{window}])))"


class PrometheusQuery:
    """Reads the same figures from a Prometheus server's HTTP API (`/api/v1/query`)."""

    def __init__(self, url: str, selector: str):
        self.url = url.rstrip("/") + "/api/v1/query"
        self.selector = selector

    async def read(self) -> Snapshot:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            gauges = {POOL_GAUGES[m]: await self._by_label(session, pool_query(m, self.selector), "pool")
                      for m in POOL_GAUGES}
            ttft = await self._scalar(session, quantile_query(TTFT, self.selector))
            tbt = await self._scalar(session, quantile_query(TBT, self.selector))
            load_query = f"max by (worker) ({WORKER_LOAD}{{{self.selector}}})"
            load = await self._by_label(session, load_query, "worker")
        return Snapshot(pool_metrics(gauges, ttft, tbt), load)

    async def _by_label(self, session, query: str, label: str) -> dict[str, float]:
        return {r["metric"][label]: v for r in await self._query(session, query)
                if label in r["metric"] and not math.isnan(v := float(r["value"][1]))}

    async def _scalar(self, session, query: str) -> float | None:
        values = [float(r["value"][1]) for r in await self._query(session, query)]
        return values[0] if values and not math.isnan(values[0]) else None

    async def _query(self, session: aiohttp.ClientSession, query: str) -> list[dict]:
        try:
            async with session.get(self.url, params={"query": query}) as resp:
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
            raise MetricsUnavailable(f"{self.url}: {e.__class__.__name__}: {e}") from e
        if body.get("status") != "success":
            raise MetricsUnavailable(f"{self.url}: {body.get('errorType')}: {body.get('error')} (query {query})")
        return body["data"]["result"]
