"""The mixed pool lends its workers to an overloaded prompt or token pool."""

import openai

from support.fake_worker import MODEL


async def complete(cluster):
    client = openai.AsyncOpenAI(base_url=cluster.base_url, api_key="x", max_retries=0)
    return await client.completions.create(model=MODEL, prompt="hello world", max_tokens=3,
                                           extra_body={"ignore_eos": True})


async def test_mixed_worker_takes_prompts_only_while_the_prompt_pool_is_overloaded(make_cluster):
    cluster = await make_cluster(prompt=1, token=1, mixed=1)
    (prompt,), (mixed,) = cluster.workers["prompt"], cluster.workers["mixed"]
    await cluster.polled()
    await complete(cluster)
    assert (len(prompt.prefills), len(mixed.prefills)) == (1, 0), "not overloaded: the mixed pool stays out"
    prompt.extra_waiting_tokens = 10_000
    await cluster.polled()
    reply = await complete(cluster)
    assert reply.usage.completion_tokens == 3
    assert (len(prompt.prefills), len(mixed.prefills)) == (1, 1)


async def test_mixed_worker_decodes_when_no_token_worker_has_room(make_cluster):
    cluster = await make_cluster(prompt=1, token=1, mixed=1)
    (token,), (mixed,) = cluster.workers["token"], cluster.workers["mixed"]
    token.num_kv_blocks = 0
    await cluster.polled()
    reply = await complete(cluster)
    assert reply.usage.completion_tokens == 3
    assert (len(token.generates), len(mixed.generates)) == (0, 1)


async def test_mixed_worker_decodes_when_the_token_workers_batch_is_full(make_cluster):
    cluster = await make_cluster(prompt=1, token=1, mixed=1)
    (token,), (mixed,) = cluster.workers["token"], cluster.workers["mixed"]
    token.max_running_requests = 4
    await cluster.polled()
    await complete(cluster)
    assert (len(token.generates), len(mixed.generates)) == (1, 0), "room in the batch: the mixed pool stays out"
    token.extra_running = 4
    await cluster.polled()
    reply = await complete(cluster)
    assert reply.usage.completion_tokens == 3
    assert (len(token.generates), len(mixed.generates)) == (1, 1)
