"""A worker taken out of its pool while it holds a request: listed as retiring until the request ends."""

from __future__ import annotations

import aiohttp
import openai
from support.fake_worker import ADMIN_TOKEN, MODEL, FakeWorker


async def pools(cluster) -> dict:
    async with aiohttp.ClientSession() as s, s.get(cluster.url + "/admin/pools") as resp:
        assert resp.status == 200
        return await resp.json()


async def put_token_pool(cluster, addresses: list[str]) -> None:
    async with aiohttp.ClientSession() as s, s.put(cluster.url + "/admin/pools/token", json={"workers": addresses},
                                                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
        assert resp.status == 200


async def test_a_removed_worker_finishes_its_request_gets_no_new_one_and_is_listed_until_done(
        make_cluster, tokenizer):
    cluster = await make_cluster(prompt=1, token=1, worker_options={"token_delay": 0.02})
    (old,) = cluster.workers["token"]
    spare = FakeWorker("token", tokenizer)
    await spare.start()
    try:
        client = openai.AsyncOpenAI(base_url=cluster.base_url, api_key="x", max_retries=0)
        stream = await client.completions.create(model=MODEL, prompt="hello", max_tokens=60, stream=True,
                                                 extra_body={"ignore_eos": True})
        chunks = aiter(stream)
        await anext(chunks)

        await put_token_pool(cluster, [spare.address])
        listed = (await pools(cluster))["token"]
        assert [w["address"] for w in listed["workers"]] == [spare.address]
        assert [(w["address"], w["inflight"]) for w in listed["retiring"]] == [(old.address, 1)]

        other = await client.completions.create(model=MODEL, prompt="hi", max_tokens=3)
        assert other.usage.completion_tokens == 3
        assert (len(old.generates), len(spare.generates)) == (1, 1), "new work goes to the pool's members only"

        text = "".join([c.choices[0].text async for c in chunks])
        assert text, "the removed worker finished the stream it held"
        for _ in range(50):
            if not (await pools(cluster))["token"]["retiring"]:
                break
            await cluster.polled()   # each round closes the retired workers with nothing in flight
        assert (await pools(cluster))["token"]["retiring"] == []
    finally:
        await spare.stop()
