"""A worker's own Prometheus `/metrics` (`--metrics-port`): its engine's queue and batch, its KV cache, its
preemptions and its prefix cache, read from the engine loop's latest stats at each scrape. Labelled by
`model_name` (the served model) and `role`; Prometheus adds the worker's address as `instance`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from phasesplit.roles.core import WorkerCore

LABELS = ("model_name", "role")


class EngineCollector:
    def __init__(self, core: WorkerCore):
        self.core = core

    def collect(self):
        stats = self.core.loop.stats
        values = [self.core.settings.served_model_name or "", self.core.role]

        def family(kind, name: str, doc: str, value: float):
            metric = kind(name, doc, labels=LABELS)
            metric.add_metric(values, value)
            return metric

        yield family(GaugeMetricFamily, "phasesplit_worker_requests_waiting",
                     "Requests waiting for the engine to schedule them", stats.waiting_requests)
        yield family(GaugeMetricFamily, "phasesplit_worker_requests_running",
                     "Requests in the engine's batch", stats.running_requests)
        yield family(GaugeMetricFamily, "phasesplit_worker_kv_blocks_used", "KV cache blocks in use", stats.used_blocks)
        yield family(GaugeMetricFamily, "phasesplit_worker_kv_blocks_free", "KV cache blocks free", stats.free_blocks)
        yield family(GaugeMetricFamily, "phasesplit_worker_kv_usage", "KV cache blocks in use over all (0 to 1)",
                     stats.used_blocks / stats.total_blocks if stats.total_blocks else 0.0)
        yield family(CounterMetricFamily, "phasesplit_worker_preemptions",
                     "Requests the engine preempted for lack of KV blocks", stats.num_preemptions)
        yield family(CounterMetricFamily, "phasesplit_worker_prefix_cache_queries",
                     "Prompt tokens looked up in the prefix cache", stats.prefix_cache_queries)
        yield family(CounterMetricFamily, "phasesplit_worker_prefix_cache_hits",
                     "Prompt tokens found in the prefix cache (not computed)", stats.prefix_cache_hits)


def serve_metrics(core: WorkerCore, host: str, port: int):
    """Starts the `/metrics` HTTP server in a thread of its own; returns the server (`.shutdown()` stops it)."""
    registry = CollectorRegistry()
    registry.register(EngineCollector(core))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
