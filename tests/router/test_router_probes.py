"""The router's liveness and readiness endpoints: no ready worker takes it out of the Service
(`/health` 503) but does not get it restarted (`/livez` 200)."""

from aiohttp.test_utils import TestClient, TestServer

from phasesplit.router.app import RouterSettings, create_app
from phasesplit.router.pools import parse_worker_list


async def test_a_router_without_workers_is_alive_but_not_ready():
    settings = RouterSettings(served_model_name="tiny", max_model_len=64,
                              workers={"mixed": parse_worker_list("127.0.0.1:1")}, poll_interval=0.05)
    async with TestClient(TestServer(create_app(settings, tokenizer=None))) as client:
        health = await client.get("/health")
        assert health.status == 503
        assert (await health.json())["status"] == "unavailable"
        live = await client.get("/livez")
        assert live.status == 200 and (await live.json()) == {"status": "alive"}
