"""A router started without a model directory reads its tokenizer from a ready worker, holds the
requests that come before (as demand on the pools), and sends work only to workers that serve the
tokenizer it has, following them when a rollout moves them to another."""

import asyncio
import json
import logging

import aiohttp
import pytest
from support.fake_worker import ADMIN_TOKEN
from support.polling import eventually

from phasesplit.engine.tokenizer import Tokenizer, read_tokenizer_files, tokenizer_digest

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3}
COMPLETION = {"model": "tiny", "prompt": "hello", "max_tokens": 3}


@pytest.fixture(scope="module")
def files_a(tiny_model_dir):
    return read_tokenizer_files(tiny_model_dir)


@pytest.fixture(scope="module")
def files_b(files_a):
    """Another model's tokenizer: the same vocabulary, another configuration."""
    config = json.loads(files_a["tokenizer_config.json"]) | {"model_max_length": 1234}
    return files_a | {"tokenizer_config.json": json.dumps(config).encode()}


@pytest.fixture
def workers(start_worker):
    return lambda role, files: start_worker(role, tokenizer_files=files)


async def request(cluster, method, path, body=None, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.request(method, cluster.url + path, json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def set_pool(cluster, pool, workers):
    status, _ = await request(cluster, "PUT", f"/admin/pools/{pool}", {"workers": [w.address for w in workers]},
                              token=ADMIN_TOKEN)
    assert status == 200


async def healthy(cluster):
    return (await request(cluster, "GET", "/health"))[0] == 200


async def test_the_router_tokenizes_with_the_tokenizer_a_worker_serves(make_cluster, files_a, tiny_model_dir):
    cluster = await make_cluster(prompt=1, token=1, tokenizer_from_workers=True,
                                 worker_options={"tokenizer_files": files_a})
    await eventually(lambda: healthy(cluster))
    status, body = await request(cluster, "POST", "/v1/chat/completions", CHAT)
    assert status == 200, body
    expected = Tokenizer.from_dir(tiny_model_dir).encode_chat(CHAT["messages"])
    assert list(cluster.workers["prompt"][0].prefills[0].prompt_token_ids) == expected
    assert sum(w.tokenizer_reads for w in cluster.all_workers()) == 1, "read once, not per request"
    status, models = await request(cluster, "GET", "/v1/models")
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert models["data"][0]["max_model_len"] == config["max_position_embeddings"]
    assert cluster.router.tokenizers.digest == tokenizer_digest(files_a)


async def test_a_request_before_any_worker_waits_as_demand_and_is_served_once_workers_join(
        make_cluster, workers, files_a):
    cluster = await make_cluster(prompt=0, token=0, served=("prompt", "token"), tokenizer_from_workers=True)
    status, body = await request(cluster, "GET", "/health")
    assert status == 200 and body["status"] == "scaled_to_zero"
    waiting = asyncio.create_task(request(cluster, "POST", "/v1/completions", COMPLETION))

    async def both_pools_show_it():
        m = await cluster.metrics()
        return all(m[("phasesplit_queue_requests", (("pool", p),))] == 1 for p in ("prompt", "token"))
    await eventually(both_pools_show_it)
    assert not waiting.done()

    await set_pool(cluster, "prompt", [await workers("prompt", files_a)])
    await set_pool(cluster, "token", [await workers("token", files_a)])
    status, body = await asyncio.wait_for(waiting, 10)
    assert status == 200 and body["usage"]["completion_tokens"] == 3


async def test_no_worker_to_read_from_within_the_queue_timeout_is_a_503_that_says_so(make_cluster):
    from phasesplit.router.waiting import QueueSettings
    cluster = await make_cluster(prompt=0, token=0, served=("prompt", "token"), tokenizer_from_workers=True,
                                 queue=QueueSettings(size=4, timeout=0.3))
    status, body = await request(cluster, "POST", "/v1/chat/completions", CHAT)
    assert status == 503
    assert "the router has no tokenizer" in body["error"]["message"]


async def test_workers_of_another_tokenizer_get_work_only_once_the_router_has_followed_them(
        make_cluster, workers, files_a, files_b):
    cluster = await make_cluster(prompt=0, token=0, tokenizer_from_workers=True, served=("mixed",))
    old = await workers("mixed", files_a)
    await set_pool(cluster, "mixed", [old])
    await eventually(lambda: healthy(cluster))

    new = await workers("mixed", files_b)     # a rollout: the new model's worker is ready beside the old one
    await set_pool(cluster, "mixed", [old, new])
    await eventually(lambda: _polled(cluster, new))
    for _ in range(4):
        assert (await request(cluster, "POST", "/v1/chat/completions", CHAT))[0] == 200
    assert new.generates == [] and len(old.generates) == 4, "the old tokenizer's ids went to a new worker"
    _, pools = await request(cluster, "GET", "/admin/pools")
    assert [w["routable"] for w in pools["mixed"]["workers"] if w["address"] == new.address] == [False]

    await set_pool(cluster, "mixed", [new])   # the old worker is gone: the router reads the new tokenizer
    status, body = await request(cluster, "POST", "/v1/chat/completions", CHAT)
    assert status == 200, body
    assert len(new.generates) == 1
    assert cluster.router.tokenizers.digest == tokenizer_digest(files_b)


async def test_a_router_given_a_model_directory_sends_nothing_to_workers_of_another_tokenizer(
        make_cluster, files_b):
    cluster = await make_cluster(prompt=0, token=0, mixed=1, worker_options={"tokenizer_files": files_b})
    await cluster.polled()
    status, body = await request(cluster, "GET", "/health")
    assert status == 503 and "is not the router's" in body["reason"]
    assert cluster.workers["mixed"][0].tokenizer_reads == 0, "a router given --model keeps its tokenizer"


async def _polled(cluster, worker):
    _, pools = await request(cluster, "GET", "/admin/pools")
    return any(w["address"] == worker.address and w["role"] for w in pools["mixed"]["workers"])


async def test_a_request_that_waited_through_a_tokenizer_change_is_tokenized_again(
        make_cluster, workers, files_a, files_b, caplog):
    cluster = await make_cluster(prompt=0, token=0, tokenizer_from_workers=True, served=("mixed",))
    old = await workers("mixed", files_a)
    await set_pool(cluster, "mixed", [old])
    await eventually(lambda: healthy(cluster))
    await set_pool(cluster, "mixed", [])        # the old worker is gone before the new one is ready
    waiting = asyncio.create_task(request(cluster, "POST", "/v1/chat/completions", CHAT))
    await eventually(lambda: cluster.router.dispatcher.queue.waiting == 1, what="the request to wait for a worker")
    new = await workers("mixed", files_b)
    await set_pool(cluster, "mixed", [new])
    with caplog.at_level(logging.INFO, logger="phasesplit.router.app"):
        status, body = await asyncio.wait_for(waiting, 10)
    assert status == 200, body
    assert [g.request_id for g in new.generates] == [body["id"]], "sent once, with the new tokenizer's ids"
    assert any("tokenizing it again" in r.getMessage() for r in caplog.records)
    metrics = await cluster.metrics()
    assert {dict(labels)["outcome"]: v for (name, labels), v in metrics.items()
            if name == "phasesplit_requests_total" and v} == {"success": 1}


async def test_a_stream_whose_worker_dies_after_the_router_moved_to_another_tokenizer_ends_with_an_error(
        make_cluster, workers, files_a, files_b):
    cluster = await make_cluster(prompt=0, token=0, tokenizer_from_workers=True, served=("mixed",))
    old = await workers("mixed", files_a)
    old.token_delay = 0.05
    await set_pool(cluster, "mixed", [old])
    await eventually(lambda: healthy(cluster))
    body = {**COMPLETION, "max_tokens": 400, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as session, session.post(cluster.url + "/v1/completions", json=body) as resp:
        events = resp.content.__aiter__()
        await anext(events)
        await set_pool(cluster, "mixed", [await workers("mixed", files_b)])   # the old one finishes what it has
        await eventually(lambda: cluster.router.tokenizers.digest == tokenizer_digest(files_b),
                         what="the router on the new tokenizer")
        await old.kill()
        rest = b"".join([line async for line in events])
    assert b"read another tokenizer" in rest, rest[-400:]
    metrics = await cluster.metrics()
    assert metrics[("phasesplit_requests_lost_total", (("stage", "mid_stream"),))] == 1
