"""The router's `/metrics` read into a `Snapshot`: one `PoolMetrics` per pool plus the KV blocks
each worker holds (the load that orders workers for scale-down). Any failure to read raises
`MetricsUnavailable`. The operator reads the same figures from Prometheus (`operator/metrics_source.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from phasesplit.control.scaling import PoolMetrics, metric_field

# spec metric name -> router gauge (labelled by `pool`)
POOL_GAUGES = {
    "queueRequests": "phasesplit_queue_requests",
    "queueTokens": "phasesplit_queue_tokens",
    "inflightRequests": "phasesplit_inflight_requests",
    "kvUtilization": "phasesplit_kv_utilization",
}
TTFT = "phasesplit_time_to_first_token_seconds"
TBT = "phasesplit_time_between_tokens_seconds"
WORKER_LOAD = "phasesplit_kv_blocks_used"
QUANTILE = 0.9
TIMEOUT = aiohttp.ClientTimeout(total=5)


class MetricsUnavailable(Exception):
    pass


@dataclass(slots=True)
class Snapshot:
    pools: dict[str, PoolMetrics]
    worker_load: dict[str, float] = field(default_factory=dict)  # "host:port" -> KV blocks used


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' `histogram_quantile` over cumulative (upper bound, count) buckets; None when empty."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return lower


class RouterScrape:
    """Reads the router's Prometheus text; TTFT/TBT P90 cover the requests since the previous read, all pools
    together (as `quantile_query`'s `sum by (le)`)."""

    def __init__(self, url: str):
        self.url = url
        self._previous: dict[str, dict[float, float]] = {}

    async def read(self) -> Snapshot:
        try:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
                async with session.get(self.url) as resp:
                    if resp.status != 200:
                        raise MetricsUnavailable(f"{self.url}: HTTP {resp.status}")
                    text = await resp.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise MetricsUnavailable(f"{self.url}: {e.__class__.__name__}: {e}") from e
        return self.parse(text)

    def parse(self, text: str) -> Snapshot:
        try:
            families = list(text_string_to_metric_families(text))
        except ValueError as e:
            raise MetricsUnavailable(f"{self.url}: not Prometheus text: {e}") from e
        gauges: dict[str, dict[str, float]] = {}
        load: dict[str, float] = {}
        p90: dict[str, float | None] = {}
        for fam in families:
            if fam.name in POOL_GAUGES.values():
                gauges[fam.name] = {s.labels["pool"]: s.value for s in fam.samples if "pool" in s.labels}
            elif fam.name == WORKER_LOAD:
                load = {s.labels["worker"]: s.value for s in fam.samples if "worker" in s.labels}
            elif fam.name in (TTFT, TBT):
                p90[fam.name] = self._recent_quantile(fam)
        return Snapshot(pool_metrics(gauges, p90.get(TTFT), p90.get(TBT)), load)

    def _recent_quantile(self, fam) -> float | None:
        now: dict[float, float] = {}   # summed over the pools and models: one P90 for all of them
        for s in fam.samples:
            if s.name.endswith("_bucket"):
                le = float(s.labels["le"])
                now[le] = now.get(le, 0.0) + s.value
        before = self._previous.get(fam.name, {})
        self._previous[fam.name] = now
        delta = [(le, count - before.get(le, 0.0)) for le, count in now.items()]
        if any(c < 0 for _, c in delta):  # the router restarted: its counters began again
            delta = list(now.items())
        return histogram_quantile(QUANTILE, delta)


def pool_metrics(gauges: dict[str, dict[str, float]], ttft: float | None, tbt: float | None) -> dict[str, PoolMetrics]:
    pools = {pool for by_pool in gauges.values() for pool in by_pool}
    out = {}
    for pool in pools:
        values = {metric_field(spec): gauges.get(metric, {}).get(pool) for spec, metric in POOL_GAUGES.items()}
        out[pool] = PoolMetrics(**values, ttft_p90_seconds=ttft, tbt_p90_seconds=tbt)
    return out
