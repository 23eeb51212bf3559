"""A client that goes away cancels its request on every worker, and the router's in-flight count returns to 0."""

import asyncio
import json

import aiohttp
import pytest
from support.fake_worker import MODEL
from support.polling import eventually


async def assert_nothing_in_flight(cluster):
    metrics = await cluster.metrics()
    for pool in ("prompt", "token", "mixed"):
        for name in ("phasesplit_inflight_requests", "phasesplit_queue_requests", "phasesplit_queue_tokens"):
            assert metrics[(name, (("pool", pool),))] == 0, (name, pool)
    assert metrics[("phasesplit_requests_total", (("model_name", MODEL), ("outcome", "cancelled")))] == 1
    assert metrics[("phasesplit_requests_total", (("model_name", MODEL), ("outcome", "success")))] == 0


@pytest.mark.parametrize("pools", [{"prompt": 1, "token": 1}, {"prompt": 0, "token": 0, "mixed": 1}],
                         ids=["split", "mixed"])
async def test_disconnect_mid_stream_aborts_on_the_workers(make_cluster, pools):
    cluster = await make_cluster(**pools, worker_options={"token_delay": 0.05})
    decoder = cluster.workers["mixed" if pools.get("mixed") else "token"][0]
    body = {"model": MODEL, "prompt": "a long story", "max_tokens": 500, "ignore_eos": True, "stream": True}

    async with aiohttp.ClientSession() as session:
        resp = await session.post(cluster.url + "/v1/completions", json=body)
        lines = []
        async for line in resp.content:
            if line.startswith(b"data: "):
                lines.append(json.loads(line[6:]))
            if len(lines) == 3:
                break
        request_id = lines[0]["id"]
        await eventually(lambda: request_id in decoder.active)
        resp.close()   # the client goes away mid-stream

    await eventually(lambda: request_id in decoder.aborted and not decoder.active)
    await cluster.router.dispatcher.drain_cleanup()
    assert decoder.aborted.count(request_id) == 1   # once, though two of the router's stages saw the request end
    assert len(decoder.generates[0].sampling.stop) == 0 and decoder.generates[0].sampling.max_tokens == 500
    await assert_nothing_in_flight(cluster)


async def test_disconnect_during_prefill_aborts_both_workers(make_cluster):
    cluster = await make_cluster(worker_options={"prefill_delay": 3.0})
    prompt_w, token_w = cluster.workers["prompt"][0], cluster.workers["token"][0]
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 5}

    async with aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):
            await session.post(cluster.url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=0.5))
    (prefill,) = prompt_w.prefills

    await eventually(lambda: prefill.request_id in prompt_w.aborted and prefill.request_id in token_w.aborted)
    await eventually(lambda: not prompt_w.active)
    assert token_w.generates == []
    await assert_nothing_in_flight(cluster)


@pytest.mark.parametrize("moment", ["re-prefill", "new-decoder"])
async def test_disconnect_during_a_migration_aborts_every_worker_of_the_new_attempt(make_cluster, moment):
    cluster = await make_cluster(prompt=1, token=2, worker_options={"token_delay": 0.02, "prefill_delay": 0.5})
    prompt_w, (first, second) = cluster.workers["prompt"][0], cluster.workers["token"]
    second.num_kv_blocks = 500   # the first one is picked first
    await cluster.polled()
    first.fail_after_tokens, first.failure = 5, "end"
    body = {"model": MODEL, "prompt": "a long story", "max_tokens": 500, "ignore_eos": True, "stream": True}

    async with aiohttp.ClientSession() as session:
        resp = await session.post(cluster.url + "/v1/completions", json=body)
        async for line in resp.content:
            if line.startswith(b"data: "):
                request_id = json.loads(line[6:])["id"]
                break
        moved = f"{request_id}~1"
        if moment == "re-prefill":
            await eventually(lambda: moved in prompt_w.active, what="the prompt phase run again")
        else:
            await eventually(lambda: moved in second.active, what="the new token worker decoding")
        resp.close()

    await eventually(lambda: moved in second.aborted and not second.active and not second.kv and not prompt_w.active,
                     what="every worker of the new attempt to let go of the request")
    if moment == "re-prefill":
        assert moved in prompt_w.aborted
    await assert_nothing_in_flight(cluster)
