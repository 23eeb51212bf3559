"""Requests that end at or right after their first token (max_tokens 1 or 2, a stop string hit by the
first token), streamed and not, leave no KV behind on a token worker whose cache holds one burst.

Their KV is streamed to the token worker layer by layer while the prompt phase runs, so it may still
be on its way when the request is already over; it must be refused or freed, not held for the lease."""

import asyncio
import random

import httpx
import pytest
from support.serving import ENGINE, manifest, start_cluster, wait_quiet

from phasesplit.engine.tokenizer import Tokenizer

from support.words import WORDS

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 512
BLOCK_SIZE = 16
PROMPT_TOKENS = (260, 320)
BURST = 30
ROUNDS = 3
# One burst holds at most BURST * 21 blocks: room for one burst, not for the KV of two.
TOKEN_KV_BLOCKS = 660


@pytest.fixture(scope="module")
def small_token_cache(tiny_model_dir, tmp_path_factory):
    doc = manifest("early-finish", {"prompt": 1, "token": 1})
    doc["spec"]["model"]["maxModelLen"] = MAX_MODEL_LEN
    doc["spec"]["pools"]["token"]["engine"] = {**ENGINE, "numKvBlocks": TOKEN_KV_BLOCKS}
    cluster = start_cluster(doc, tiny_model_dir, tmp_path_factory.mktemp("early-finish-logs"))
    try:
        yield cluster
    finally:
        cluster.stop(15)


def prompts(tokenizer: Tokenizer, rng: random.Random, n: int) -> list[str]:
    out = []
    while len(out) < n:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(80, 130)))
        if PROMPT_TOKENS[0] <= len(tokenizer.encode(text)) <= PROMPT_TOKENS[1]:
            out.append(text)
    return out


def body(i: int, prompt: str, first_text: str) -> dict:
    """Thirds: max_tokens 1, max_tokens 2, and a stop string that the first token's text hits."""
    request = {"model": "tiny", "prompt": prompt, "temperature": 0, "stream": i % 2 == 0}
    if i % 3 == 0:
        return request | {"max_tokens": 1, "ignore_eos": True}
    if i % 3 == 1:
        return request | {"max_tokens": 2, "ignore_eos": True}
    return request | {"max_tokens": 16, "stop": [first_text[:1] or "\n"]}


async def first_texts(client: httpx.AsyncClient, url: str, texts: list[str]) -> list[str]:
    """Each prompt's greedy first token as text (what a stop string must hit to end the request there)."""
    async def one(text):
        reply = await client.post(url, json={"model": "tiny", "prompt": text, "temperature": 0, "max_tokens": 1,
                                             "ignore_eos": True})
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["text"]
    return await asyncio.gather(*(one(text) for text in texts))


async def send(client: httpx.AsyncClient, url: str, request: dict) -> str:
    """The finish reason, or what went wrong."""
    if not request["stream"]:
        reply = await client.post(url, json=request)
        if reply.status_code != 200:
            return f"HTTP {reply.status_code}: {reply.text}"
        return reply.json()["choices"][0]["finish_reason"]
    finish, done = None, False
    async with client.stream("POST", url, json=request) as reply:
        if reply.status_code != 200:
            return f"HTTP {reply.status_code}: {(await reply.aread()).decode()}"
        async for line in reply.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: {"):
                event = httpx.Response(200, content=line[6:]).json()
                if "error" in event:
                    return f"error event: {event['error']}"
                finish = event["choices"][0]["finish_reason"] or finish
    return finish if done else f"stream ended without [DONE] (finish_reason {finish})"


async def burst(base_url: str, texts: list[str]) -> list[str]:
    url = f"{base_url}/v1/completions"
    async with httpx.AsyncClient(timeout=60) as client:
        firsts = await first_texts(client, url, texts)
        return await asyncio.gather(*(send(client, url, body(i, text, first))
                                      for i, (text, first) in enumerate(zip(texts, firsts))))


def test_requests_ending_at_their_first_tokens_leave_no_kv_on_the_token_worker(small_token_cache, tiny_model_dir):
    tokenizer = Tokenizer.from_dir(tiny_model_dir)
    rng = random.Random(11)
    for round_ in range(ROUNDS):
        outcomes = asyncio.run(burst(small_token_cache.base_url, prompts(tokenizer, rng, BURST)))
        failed = [(i, o) for i, o in enumerate(outcomes) if o not in ("length", "stop")]
        assert not failed, f"round {round_}: {len(failed)} of {BURST} requests failed: {failed[:3]}"
        assert outcomes.count("stop") >= BURST // 6, outcomes  # the first-token stops did happen
        # Well within the 30 s lease and the 10 s transfer timeout: nothing waits for them.
        state = wait_quiet(small_token_cache, timeout=2.0)
        assert all(v == (0, 0, 0, 0) for k, v in state.items() if k != "router inflight"), (round_, state)
        assert state["router inflight"] == 0, (round_, state)
