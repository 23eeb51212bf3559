"""A pool scaled to zero: the router holds its requests in a bounded queue, shows them in the pool's
queue gauges (the demand that brings the pool back), and serves them once a worker joins."""

import asyncio

import aiohttp
import pytest
from support.fake_worker import ADMIN_TOKEN, MODEL
from support.polling import eventually

from phasesplit.router.waiting import QueueSettings

BODY = {"model": "tiny", "prompt": "hello", "max_tokens": 3}
SPLIT = ("prompt", "token")


async def post(cluster, body=BODY):
    async with aiohttp.ClientSession() as s, s.post(cluster.url + "/v1/completions", json=body) as resp:
        return resp.status, await resp.json()


async def get(cluster, path):
    async with aiohttp.ClientSession() as s, s.get(cluster.url + path) as resp:
        return resp.status, await resp.json()


def gauge(metrics, name, pool):
    return metrics[(f"phasesplit_{name}", (("pool", pool),))]


@pytest.fixture
async def token_worker(start_worker):
    return await start_worker("token")


async def test_a_request_for_an_empty_pool_waits_and_is_served_when_a_worker_joins(make_cluster, token_worker):
    cluster = await make_cluster(prompt=1, token=0, served=SPLIT)
    status, body = await get(cluster, "/health")
    assert status == 200 and body == {"status": "scaled_to_zero", "route": "split", "waiting_for": ["token"]}

    waiting = asyncio.create_task(post(cluster))

    async def token_queue_shows_it():
        m = await cluster.metrics()
        return gauge(m, "queue_requests", "token") == 1 and gauge(m, "queue_tokens", "token") == 3
    await eventually(token_queue_shows_it)
    m = await cluster.metrics()
    assert gauge(m, "queue_requests", "prompt") == 0, "the prompt pool has a worker: no demand for it"
    assert not waiting.done()

    async with aiohttp.ClientSession() as s, s.put(cluster.url + "/admin/pools/token",
                                                   json={"workers": [token_worker.address]},
                                                   headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
        assert resp.status == 200
    status, body = await asyncio.wait_for(waiting, 10)
    assert status == 200 and body["usage"]["completion_tokens"] == 3
    assert len(token_worker.generates) == 1
    m = await cluster.metrics()
    assert gauge(m, "queue_requests", "token") == 0 and gauge(m, "inflight_requests", "token") == 0


async def test_a_request_that_waits_too_long_gets_a_503_naming_the_pool(make_cluster):
    cluster = await make_cluster(prompt=1, token=0, served=SPLIT, queue=QueueSettings(size=4, timeout=0.3))
    status, body = await post(cluster)
    assert status == 503
    assert "token pool" in body["error"]["message"] and "0.3 s" in body["error"]["message"]
    m = await cluster.metrics()
    assert gauge(m, "queue_requests", "token") == 0 and gauge(m, "queue_tokens", "token") == 0
    assert m[("phasesplit_requests_total", (("model_name", MODEL), ("outcome", "rejected")))] == 1


async def test_a_full_queue_answers_503_at_once(make_cluster):
    cluster = await make_cluster(prompt=0, token=0, mixed=0, served=("mixed",),
                                 queue=QueueSettings(size=1, timeout=5.0))
    first = asyncio.create_task(post(cluster))

    async def one_waits():
        return gauge(await cluster.metrics(), "queue_requests", "mixed") == 1
    await eventually(one_waits)
    status, body = await asyncio.wait_for(post(cluster), 2)
    assert status == 503 and "mixed pool" in body["error"]["message"] and "full" in body["error"]["message"]
    first.cancel()


async def test_without_a_queue_an_empty_pool_is_a_503_at_once_and_not_ready(make_cluster):
    cluster = await make_cluster(prompt=1, token=0, served=SPLIT, queue=QueueSettings(size=0))
    status, body = await asyncio.wait_for(post(cluster), 2)
    assert status == 503 and "token pool: no workers" in body["error"]["message"]
    assert (await get(cluster, "/health"))[0] == 503
