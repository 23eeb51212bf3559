"""Admission control: overload is refused, not queued. With the workers' batches full, a request that
cannot start within maxQueueWaitSeconds (or finds maxQueueLength requests waiting) gets a 429 with
Retry-After, which the official client raises as RateLimitError, quickly; the admitted requests keep
their latency; the waiting requests show in the queue gauges the autoscaler reads."""

import asyncio
import time

import openai
import pytest
from support import prom
from support.fake_worker import MODEL
from support.polling import eventually

from phasesplit.engine.tokenizer import Tokenizer
from phasesplit.router.admission import AdmissionSettings
from phasesplit.router.pools import WorkerSpec

BATCH = 2          # the token worker's batch limit, as its Load reports it
TOKENS = 20        # each request's output: TOKENS * TOKEN_DELAY seconds, far longer than the wait
TOKEN_DELAY = 0.05
WAIT = 0.5
QUEUE = 4
BURST = 20


def client(cluster, api_key: str = "x") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=cluster.base_url, api_key=api_key, max_retries=0)


async def timed_completion(api: openai.AsyncOpenAI, stream: bool) -> tuple[float, object]:
    """(seconds, the completion's text or the exception it raised)."""
    start = time.monotonic()
    try:
        if stream:
            chunks = await api.completions.create(model=MODEL, prompt="hello world", max_tokens=TOKENS, stream=True,
                                                  extra_body={"ignore_eos": True})
            text = "".join([c.choices[0].text async for c in chunks if c.choices])
        else:
            reply = await api.completions.create(model=MODEL, prompt="hello world", max_tokens=TOKENS,
                                                 extra_body={"ignore_eos": True})
            text = reply.choices[0].text
        return time.monotonic() - start, text
    except openai.APIError as e:
        return time.monotonic() - start, e


@pytest.fixture
async def busy_cluster(make_cluster):
    cluster = await make_cluster(prompt=1, token=1, worker_options={"token_delay": TOKEN_DELAY},
                                 admission=AdmissionSettings(max_queue_wait=WAIT, max_queue_length=QUEUE))
    cluster.workers["token"][0].max_running_requests = BATCH
    await cluster.polled()
    return cluster


async def test_an_overload_burst_is_refused_quickly_with_429_and_the_admitted_keep_their_latency(busy_cluster):
    cluster, api = busy_cluster, client(busy_cluster)
    alone, expected = await timed_completion(api, stream=False)
    assert isinstance(expected, str)

    burst = [asyncio.create_task(timed_completion(api, stream=i % 2 == 0)) for i in range(BURST)]

    async def queue_is_full():
        m = await cluster.metrics()
        return prom.value(m, "phasesplit_admission_waiting") == QUEUE and m
    m = await eventually(queue_is_full, what="the admission queue to fill")
    assert prom.value(m, "phasesplit_admission_running") == BATCH
    assert prom.value(m, "phasesplit_queue_requests", pool="token") >= QUEUE, "the waiting are the token pool's demand"
    assert prom.value(m, "phasesplit_queue_tokens", pool="token") >= QUEUE * TOKENS

    results = await asyncio.gather(*burst)
    served = [(t, r) for t, r in results if isinstance(r, str)]
    refused = [(t, r) for t, r in results if not isinstance(r, str)]
    assert len(served) == BATCH and all(text == expected for _, text in served)
    assert all(isinstance(e, openai.RateLimitError) for _, e in refused), refused
    assert len(refused) == BURST - BATCH
    for _, e in refused:
        assert e.status_code == 429 and e.code == "rate_limit_exceeded"
        assert e.response.headers["Retry-After"] == "1"
    assert max(t for t, _ in refused) < WAIT + 1.5, "refusals are quick"
    slowest = max(t for t, _ in served)
    assert slowest < alone * 1.5 + 0.5, f"the admitted requests keep their latency: {slowest:.2f} s, alone {alone:.2f} s"

    m = await cluster.metrics()
    assert prom.value(m, "phasesplit_admission_refused_total", reason="queue_full") == BURST - BATCH - QUEUE
    assert prom.value(m, "phasesplit_admission_refused_total", reason="queue_wait") == QUEUE
    assert prom.value(m, "phasesplit_requests_total", outcome="rejected") == BURST - BATCH
    assert prom.value(m, "phasesplit_admission_running") == prom.value(m, "phasesplit_admission_waiting") == 0
    assert prom.value(m, "phasesplit_queue_requests") == prom.value(m, "phasesplit_inflight_requests") == 0


async def test_a_request_that_finds_the_queue_full_is_refused_before_it_is_tokenized(busy_cluster, monkeypatch):
    cluster, api = busy_cluster, client(busy_cluster)
    first = [asyncio.create_task(timed_completion(api, stream=True)) for _ in range(BATCH + QUEUE)]

    async def queue_is_full():
        return prom.value(await cluster.metrics(), "phasesplit_admission_waiting") == QUEUE
    await eventually(queue_is_full, what="the admission queue to fill")
    tokenized = []
    encode = Tokenizer.encode
    monkeypatch.setattr(Tokenizer, "encode", lambda self, text, *a, **k: tokenized.append(text) or
                        encode(self, text, *a, **k))
    excess = await asyncio.gather(*(timed_completion(api, stream=True) for _ in range(BURST - BATCH - QUEUE)))
    assert all(isinstance(e, openai.RateLimitError) for _, e in excess), excess
    assert "hello world" not in tokenized, "a request refused for a full queue was tokenized"
    await asyncio.gather(*first)
    m = await cluster.metrics()
    assert prom.value(m, "phasesplit_admission_refused_total", reason="queue_full") == BURST - BATCH - QUEUE


async def test_a_request_waits_for_a_place_that_frees_within_the_wait(make_cluster):
    cluster = await make_cluster(prompt=1, token=1, worker_options={"token_delay": TOKEN_DELAY},
                                 admission=AdmissionSettings(max_queue_wait=30, max_queue_length=QUEUE))
    cluster.workers["token"][0].max_running_requests = 1
    await cluster.polled()
    api = client(cluster)
    first = asyncio.create_task(timed_completion(api, stream=True))
    await eventually(lambda: cluster.router.dispatcher.admission.running == 1)
    second = asyncio.create_task(timed_completion(api, stream=False))

    async def second_waits():
        return prom.value(await cluster.metrics(), "phasesplit_admission_waiting") == 1
    await eventually(second_waits)
    assert len(cluster.workers["prompt"][0].prefills) == 1, "the waiting request is not sent to the workers"
    (_, a), (_, b) = await asyncio.gather(first, second)
    assert isinstance(a, str) and a == b
    m = await cluster.metrics()
    assert prom.value(m, "phasesplit_admission_wait_seconds_count") == 2


async def test_an_api_key_may_have_at_most_max_streams_per_key_in_flight(make_cluster):
    cluster = await make_cluster(prompt=1, token=1, api_key="key", worker_options={"token_delay": TOKEN_DELAY},
                                 admission=AdmissionSettings(max_streams_per_key=2))
    streams = [await client(cluster, "key").completions.create(model=MODEL, prompt="hi", max_tokens=TOKENS,
                                                                stream=True, extra_body={"ignore_eos": True})
               for _ in range(2)]
    with pytest.raises(openai.RateLimitError, match="maxStreamsPerKey") as refused:
        await client(cluster, "key").completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert refused.value.response.headers["Retry-After"] == "1"
    for stream in streams:
        assert len([c async for c in stream]) == TOKENS
    reply = await client(cluster, "key").completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert reply.usage.completion_tokens == 2
    m = await cluster.metrics()
    assert prom.value(m, "phasesplit_admission_refused_total", reason="key_limit") == 1


async def test_a_request_for_a_pool_at_zero_waits_for_its_worker_beyond_the_admission_wait(make_cluster, start_worker):
    """A worker takes longer to start than a request should wait for a batch: the wait for a pool's first
    worker is the scale-from-zero queue's, and admission begins once the pool can serve."""
    cluster = await make_cluster(prompt=1, token=0, served=("prompt", "token"),
                                 admission=AdmissionSettings(max_queue_wait=0.001))
    worker = await start_worker("token")
    worker.max_running_requests = 1
    waiting = asyncio.create_task(client(cluster).completions.create(model=MODEL, prompt="hi", max_tokens=3))

    async def token_pool_shows_demand():
        return prom.value(await cluster.metrics(), "phasesplit_queue_requests", pool="token") == 1
    await eventually(token_pool_shows_demand)
    await cluster.router.pools.set_members("token", [WorkerSpec.parse(worker.address)])
    reply = await asyncio.wait_for(waiting, 10)
    assert reply.usage.completion_tokens == 3


async def test_each_of_two_router_replicas_admits_its_share_of_the_batches(make_cluster):
    """Two routers in front of the same workers (`--replicas 2`): each admits half the room (rounded up),
    so together they send the workers no more than their batches hold."""
    cluster = await make_cluster(prompt=1, token=1, worker_options={"token_delay": TOKEN_DELAY},
                                 admission=AdmissionSettings(max_queue_wait=WAIT, max_queue_length=QUEUE, replicas=2))
    token = cluster.workers["token"][0]
    token.max_running_requests = 3
    await cluster.polled()
    assert cluster.router.dispatcher.admission.room() == 2
    token.max_running_requests = 4
    await cluster.polled()
    assert cluster.router.dispatcher.admission.room() == 2
    outcomes = await asyncio.gather(*(timed_completion(client(cluster), stream=True) for _ in range(3)))
    served = [text for _, text in outcomes if isinstance(text, str)]
    refused = [error for _, error in outcomes if isinstance(error, openai.RateLimitError)]
    assert (len(served), len(refused)) == (2, 1)
