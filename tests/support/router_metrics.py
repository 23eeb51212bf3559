"""A fixture HTTP server that serves router metrics in Prometheus text, as the router's /metrics does.

The figures come from a real prometheus_client registry with the router's metric names and labels
(docs/architecture.md, "Metrics the autoscaler reads"); tests set them and can make the server fail.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest


class FakeRouterMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_requests = Gauge("phasesplit_queue_requests", "queued requests", ["pool"], registry=r)
        self.queue_tokens = Gauge("phasesplit_queue_tokens", "queued tokens", ["pool"], registry=r)
        self.inflight = Gauge("phasesplit_inflight_requests", "in-flight requests", ["pool"], registry=r)
        self.workers = Gauge("phasesplit_pool_workers", "workers", ["pool"], registry=r)
        self.kv_utilization = Gauge("phasesplit_kv_utilization", "KV used/total", ["pool"], registry=r)
        self.kv_used = Gauge("phasesplit_kv_blocks_used", "KV blocks used", ["worker"], registry=r)
        self.ttft = Histogram("phasesplit_time_to_first_token_seconds", "TTFT", registry=r,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.tbt = Histogram("phasesplit_time_between_tokens_seconds", "TBT", registry=r,
                             buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
        self.status = 200
        self.scrapes = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    def set_pool(self, pool: str, *, queue_tokens=0, queue_requests=0, inflight=0, kv_utilization=0.0):
        self.queue_tokens.labels(pool).set(queue_tokens)
        self.queue_requests.labels(pool).set(queue_requests)
        self.inflight.labels(pool).set(inflight)
        self.kv_utilization.labels(pool).set(kv_utilization)

    async def _metrics(self, _request: web.Request) -> web.Response:
        self.scrapes += 1
        if self.status != 200:
            return web.Response(status=self.status, text="router unavailable")
        return web.Response(body=generate_latest(self.registry), content_type="text/plain")

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{self.port}/metrics"

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
