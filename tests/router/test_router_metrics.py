"""/metrics parses with prometheus_client and carries the names the autoscaler reads, with real values."""

import asyncio

import aiohttp
import openai
from support.fake_worker import MODEL
from support.polling import eventually

NAMES = ["phasesplit_queue_requests", "phasesplit_queue_tokens", "phasesplit_inflight_requests",
         "phasesplit_pool_workers", "phasesplit_kv_blocks_used", "phasesplit_kv_blocks_free",
         "phasesplit_kv_utilization", "phasesplit_time_to_first_token_seconds_count",
         "phasesplit_time_between_tokens_seconds_count", "phasesplit_request_latency_seconds_count",
         "phasesplit_kv_transfer_bytes_total", "phasesplit_kv_transfer_seconds_total", "phasesplit_requests_total",
         "phasesplit_worker_streams_ended_total", "phasesplit_prompt_tokens_total", "phasesplit_generation_tokens_total"]


def pool(name):
    return (("pool", name),)


def model(**labels):
    """The labels of a request-level series: the served model's name and `labels`."""
    return tuple(sorted({"model_name": MODEL, **labels}.items()))


def model_pool(name):
    return model(pool=name)


async def gauge(cluster, name: str, pool_name: str, holds) -> bool:
    return holds((await cluster.metrics())[(name, pool(pool_name))])


async def test_metrics_after_traffic(make_cluster, tokenizer):
    cluster = await make_cluster(prompt=1, token=2)
    client = openai.AsyncOpenAI(base_url=cluster.base_url, api_key="x", max_retries=0)
    prompts = ["one two three", "four five", "six"]
    for p in prompts:
        await client.completions.create(model=MODEL, prompt=p, max_tokens=5, extra_body={"ignore_eos": True})
    async with aiohttp.ClientSession() as s, s.post(cluster.base_url + "/completions", data=b"{") as resp:
        assert resp.status == 400
    await cluster.polled()   # the workers' load after the traffic

    m = await cluster.metrics()

    assert set(NAMES) <= {name for name, _ in m}
    assert m[("phasesplit_pool_workers", pool("prompt"))] == 1
    assert m[("phasesplit_pool_workers", pool("token"))] == 2
    assert m[("phasesplit_pool_workers", pool("mixed"))] == 0
    for w in cluster.workers["token"]:
        assert m[("phasesplit_kv_blocks_free", (("worker", w.address),))] == 1000
        assert m[("phasesplit_kv_blocks_used", (("worker", w.address),))] == 0
    assert m[("phasesplit_kv_utilization", pool("token"))] == 0
    ended = {w.address: m.get(("phasesplit_worker_streams_ended_total", (("reason", "length"), ("worker", w.address))), 0)
             for w in cluster.workers["token"]}
    assert sum(ended.values()) == 3, f"each request ended its stream by length on a token worker: {ended}"
    assert m[("phasesplit_time_to_first_token_seconds_count", model_pool("prompt"))] == 3
    assert m[("phasesplit_time_between_tokens_seconds_count", model_pool("token"))] == 3 * 4
    assert m[("phasesplit_request_latency_seconds_count", model_pool("token"))] == 3
    prompt_tokens = sum(len(tokenizer.encode(p)) for p in prompts)
    assert m[("phasesplit_prompt_tokens_total", model())] == prompt_tokens
    assert m[("phasesplit_generation_tokens_total", model())] == 3 * 5
    assert m[("phasesplit_kv_transfer_bytes_total", ())] == 1024 * prompt_tokens
    assert m[("phasesplit_kv_transfer_seconds_total", ())] > 0
    assert m[("phasesplit_requests_total", model(outcome="success"))] == 3
    assert m[("phasesplit_requests_total", model(outcome="rejected"))] == 1
    assert m[("phasesplit_requests_total", model(outcome="error"))] == 0


async def test_queue_gauges_follow_the_phases(make_cluster, tokenizer):
    cluster = await make_cluster(worker_options={"prefill_delay": 1.0, "token_delay": 0.15})
    client = openai.AsyncOpenAI(base_url=cluster.base_url, api_key="x", max_retries=0)
    prompts = ["alpha beta gamma", "delta epsilon"]
    tasks = [asyncio.create_task(client.completions.create(model=MODEL, prompt=p, max_tokens=8,
                                                           extra_body={"ignore_eos": True})) for p in prompts]
    await eventually(lambda: gauge(cluster, "phasesplit_inflight_requests", "prompt", lambda v: v == 2),
                     what="both requests in the prompt phase")
    m = await cluster.metrics()
    assert m[("phasesplit_queue_requests", pool("prompt"))] == 2
    assert m[("phasesplit_inflight_requests", pool("prompt"))] == 2
    assert m[("phasesplit_queue_tokens", pool("prompt"))] == sum(len(tokenizer.encode(p)) for p in prompts)
    assert m[("phasesplit_inflight_requests", pool("token"))] == 0

    await eventually(lambda: gauge(cluster, "phasesplit_inflight_requests", "token", lambda v: v == 2),
                     timeout=10, what="both requests decoding")   # 7 tokens each to come, one every 0.15 s
    await eventually(lambda: gauge(cluster, "phasesplit_queue_tokens", "token", lambda v: v < 2 * 7),
                     what="the first decoded token")
    m = await cluster.metrics()
    assert m[("phasesplit_inflight_requests", pool("prompt"))] == 0
    assert m[("phasesplit_queue_tokens", pool("prompt"))] == 0
    assert m[("phasesplit_inflight_requests", pool("token"))] == 2
    assert 0 < m[("phasesplit_queue_tokens", pool("token"))] < 2 * 7

    await asyncio.gather(*tasks)
    m = await cluster.metrics()
    assert m[("phasesplit_inflight_requests", pool("token"))] == 0
    assert m[("phasesplit_queue_tokens", pool("token"))] == 0
