"""A fixture HTTP server that serves router metrics in Prometheus text, as the router's /metrics does.

It is the router's own `RouterMetrics` (the same names, labels and buckets); tests set the figures
and can make the server fail.
"""

from __future__ import annotations

from aiohttp import web

from phasesplit.router.metrics import RouterMetrics


class FakeRouterMetrics(RouterMetrics):
    def __init__(self):
        super().__init__()
        self.status = 200
        self.scrapes = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    def set_pool(self, pool: str, *, queue_tokens=0, queue_requests=0, inflight=0, kv_utilization=0.0):
        self.queue_tokens.labels(pool).set(queue_tokens)
        self.queue_requests.labels(pool).set(queue_requests)
        self.inflight_requests.labels(pool).set(inflight)
        self.kv_utilization.labels(pool).set(kv_utilization)

    async def _metrics(self, _request: web.Request) -> web.Response:
        self.scrapes += 1
        if self.status != 200:
            return web.Response(status=self.status, text="router unavailable")
        return web.Response(body=self.render(), content_type="text/plain")

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
