"""Join-the-shortest-queue: prompt workers by pending prompt tokens, token workers by free KV blocks."""

import asyncio

import openai
from support.fake_worker import MODEL, FakeWorker
from support.polling import eventually

from phasesplit.router.scheduling import Turns, pick_prompt_worker, pick_token_worker
from phasesplit.router.workers import WorkerState
from phasesplit.v1 import worker_pb2 as pb


def client(cluster):
    return openai.AsyncOpenAI(base_url=cluster.base_url, api_key="x", max_retries=0)


async def complete(cluster, prompt="hello world", max_tokens=3):
    return await client(cluster).completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                                    extra_body={"ignore_eos": True})


async def test_prompt_worker_with_the_shorter_polled_queue_gets_the_requests(make_cluster):
    cluster = await make_cluster(prompt=2, token=1)
    busy, idle = cluster.workers["prompt"]
    busy.extra_waiting_tokens = 500
    await cluster.polled()
    for _ in range(3):
        await complete(cluster)
    assert (len(busy.prefills), len(idle.prefills)) == (0, 3)

    busy.extra_waiting_tokens, idle.extra_waiting_tokens = 0, 800
    await cluster.polled()
    await complete(cluster)
    assert (len(busy.prefills), len(idle.prefills)) == (1, 3)


async def test_router_counts_the_prompt_tokens_it_has_sent(make_cluster):
    # The long prompt's prefill outlasts sending the short ones even when a loaded machine sends them slowly.
    cluster = await make_cluster(prompt=2, token=1, worker_options={"prefill_delay": 2.0})
    long_prompt, short_prompt = "word " * 100, "hi"
    tasks = []
    for prompt in (long_prompt, short_prompt, short_prompt, short_prompt):
        tasks.append(asyncio.create_task(complete(cluster, prompt)))
        await eventually(lambda: sum(len(w.prefills) for w in cluster.workers["prompt"]) == len(tasks),
                         interval=0.01, what="a prompt worker to get the prompt")   # in this order
    await asyncio.gather(*tasks)
    counts = sorted(len(w.prefills) for w in cluster.workers["prompt"])
    assert counts == [1, 3], "the three short prompts queue behind each other, not behind the long one"


async def test_token_worker_with_most_free_kv_blocks_is_chosen(make_cluster):
    cluster = await make_cluster(prompt=1, token=2)
    small, large = cluster.workers["token"]
    small.num_kv_blocks = 50
    await cluster.polled()
    for _ in range(3):
        await complete(cluster)
    assert (len(small.generates), len(large.generates)) == (0, 3)


async def test_a_draining_prompt_worker_is_retried_once_on_another(make_cluster):
    cluster = await make_cluster(prompt=2, token=1)
    draining, healthy = cluster.workers["prompt"]
    healthy.extra_waiting_tokens = 100   # the draining one looks better, so it is tried first
    draining.refuse_prefill = True       # it started draining after the last poll
    await cluster.polled()
    reply = await complete(cluster)
    assert reply.usage.completion_tokens == 3
    assert len(draining.prefills) == 1 and len(healthy.prefills) == 1

    healthy.refuse_prefill = True
    try:
        await complete(cluster)
        raise AssertionError("expected a 503")
    except openai.InternalServerError as e:
        assert e.status_code == 503


async def test_a_worker_polled_as_draining_gets_no_work(make_cluster):
    cluster = await make_cluster(prompt=2, token=1)
    draining, healthy = cluster.workers["prompt"]
    draining.draining = True
    healthy.extra_waiting_tokens = 10_000
    await cluster.polled()
    await complete(cluster)
    assert (len(draining.prefills), len(healthy.prefills)) == (0, 1)


def worker(address, pool, waiting_tokens=0, free=100):
    w = WorkerState(address, pool)
    w.info = pb.WorkerInfo(role=pool, layout=pb.KVLayout(block_size=16))
    w.load = pb.WorkerLoad(waiting_tokens=waiting_tokens, kv_blocks_free=free)
    return w


async def test_pick_prompt_worker_uses_the_larger_of_own_and_polled_queue():
    a, b = worker("a:1", "prompt", waiting_tokens=50), worker("b:1", "prompt")
    b.pending_tokens = 60
    assert pick_prompt_worker([a, b]) is a
    assert pick_prompt_worker([a, b], exclude=["a:1"]) is b
    a.load = None   # stopped answering Load
    assert pick_prompt_worker([a, b]) is b


async def test_equal_prompt_workers_take_turns():
    a, b = worker("a:1", "prompt"), worker("b:1", "prompt")
    turns = Turns()
    assert [turns.take(pick_prompt_worker([a, b])).address for _ in range(4)] == ["a:1", "b:1", "a:1", "b:1"]


async def test_token_reservations_count_until_a_poll_begun_after_the_kv_landed(tokenizer):
    fake = FakeWorker("token", tokenizer, num_kv_blocks=100)
    a, b = WorkerState(await fake.start(), "token"), worker("b:1", "token", free=90)
    try:
        await a.poll(timeout=1.0)
        a.reserve("r1", 20)
        assert a.free_blocks == 80 and pick_token_worker([a, b]) is b
        await a.poll(timeout=1.0)
        assert a.free_blocks == 80, "the KV has not landed: the reservation stands"
        in_flight = asyncio.create_task(a.poll(timeout=1.0))   # begun before the KV landed
        await asyncio.sleep(0)
        a.settle("r1")
        await in_flight
        assert a.free_blocks == 80, "a poll begun before the KV landed may not count it"
        await a.poll(timeout=1.0)
        assert a.free_blocks == 100 and pick_token_worker([a, b]) is a
    finally:
        await a.close()
        await fake.stop()
