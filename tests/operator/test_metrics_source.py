"""Reading pool metrics from a router's /metrics (served over HTTP) and from the Prometheus HTTP API."""

import pytest
from aiohttp import web

from phasesplit.control.router_metrics import MetricsUnavailable, RouterScrape, histogram_quantile
from phasesplit.operator.metrics_source import PrometheusQuery, router_selector


async def test_router_scrape_reads_each_pool_and_worker_load(router_metrics):
    router_metrics.set_pool("prompt", queue_tokens=1536, queue_requests=3, inflight=2, kv_utilization=0.25)
    router_metrics.set_pool("token", queue_tokens=900, queue_requests=0, inflight=17, kv_utilization=0.8)
    router_metrics.kv_blocks_used.labels("10.0.0.7:50051").set(40)
    router_metrics.kv_blocks_used.labels("10.0.0.8:50051").set(3)
    snap = await RouterScrape(router_metrics.url).read()
    assert snap.pools["prompt"].queue_tokens == 1536 and snap.pools["prompt"].queue_requests == 3
    assert snap.pools["token"].inflight_requests == 17 and snap.pools["token"].kv_utilization == 0.8
    assert snap.worker_load == {"10.0.0.7:50051": 40, "10.0.0.8:50051": 3}


async def test_latency_p90_covers_only_requests_since_the_previous_read(router_metrics):
    router_metrics.set_pool("prompt")
    scrape = RouterScrape(router_metrics.url)
    for _ in range(100):
        router_metrics.ttft.labels(pool="prompt").observe(3.0)    # an old slow period
    first = await scrape.read()
    assert 2.5 < first.pools["prompt"].ttft_p90_seconds <= 5
    for _ in range(100):
        router_metrics.ttft.labels(pool="mixed").observe(0.07)    # now fast again (all pools count)
    second = await scrape.read()
    assert 0.05 < second.pools["prompt"].ttft_p90_seconds <= 0.1
    third = await scrape.read()                 # no new requests: no figure, not a stale one
    assert third.pools["prompt"].ttft_p90_seconds is None


async def test_router_down_or_failing_is_unavailable(router_metrics):
    router_metrics.status = 503
    with pytest.raises(MetricsUnavailable, match="HTTP 503"):
        await RouterScrape(router_metrics.url).read()
    await router_metrics.stop()
    with pytest.raises(MetricsUnavailable, match=str(router_metrics.port)):
        await RouterScrape(router_metrics.url).read()


@pytest.mark.parametrize("buckets, expected", [
    ([(0.1, 50), (0.5, 100), (float("inf"), 100)], 0.42),   # rank 90 in (0.1, 0.5]: 0.1 + 0.4 * 40/50
    ([(1.0, 0), (float("inf"), 0)], None),
    ([(1.0, 5), (float("inf"), 10)], 1.0),                  # above the last finite bound
])
def test_histogram_quantile(buckets, expected):
    got = histogram_quantile(0.9, buckets)
    assert got is None if expected is None else got == pytest.approx(expected)


async def test_prometheus_query_sends_per_pool_queries_and_reads_vectors():
    seen = []

    async def query(request):
        q = request.query["query"]
        seen.append(q)
        if "phasesplit_queue_tokens" in q:
            result = [{"metric": {"pool": "prompt"}, "value": [0, "2048"]},
                      {"metric": {"pool": "token"}, "value": [0, "12"]}]
        elif "time_to_first_token" in q:
            result = [{"metric": {}, "value": [0, "0.8"]}]
        elif "time_between_tokens" in q:
            result = [{"metric": {}, "value": [0, "NaN"]}]
        elif "kv_blocks_used" in q:
            result = [{"metric": {"worker": "10.0.0.9:50051"}, "value": [0, "7"]}]
        else:
            result = []
        return web.json_response({"status": "success", "data": {"resultType": "vector", "result": result}})

    app = web.Application()
    app.router.add_get("/api/v1/query", query)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        snap = await PrometheusQuery(f"http://127.0.0.1:{port}/", router_selector("ml", "tiny")).read()
    finally:
        await runner.cleanup()
    assert snap.pools["prompt"].queue_tokens == 2048 and snap.pools["token"].queue_tokens == 12
    assert snap.pools["prompt"].ttft_p90_seconds == 0.8 and snap.pools["token"].tbt_p90_seconds is None
    assert snap.pools["prompt"].queue_requests is None
    assert snap.worker_load == {"10.0.0.9:50051": 7}
    assert 'sum by (pool) (phasesplit_queue_tokens{namespace="ml",service="tiny"})' in seen


async def test_prometheus_down_is_unavailable():
    with pytest.raises(MetricsUnavailable):
        await PrometheusQuery("http://127.0.0.1:9", router_selector("ml", "tiny")).read()
