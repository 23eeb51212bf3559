"""Split serving computes what colocated serving computes: same greedy tokens, request by request."""

import asyncio
import random

import openai
import pytest

from support.words import WORDS

pytestmark = pytest.mark.slow


def prompts(n: int, seed: int = 7) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 120))), rng.randint(4, 24)) for _ in range(n)]


async def complete_all(base_url: str, jobs: list[tuple[str, int]]) -> list[tuple[str, int, str]]:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        async def one(i, prompt, max_tokens):
            reply = await client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                                    temperature=0, extra_body={"ignore_eos": i % 2 == 0})
            return reply.choices[0].text, reply.usage.completion_tokens, reply.choices[0].finish_reason
        return await asyncio.gather(*(one(i, p, m) for i, (p, m) in enumerate(jobs)))


def test_40_concurrent_greedy_requests_match_one_mixed_worker(split, mixed):
    jobs = prompts(40)
    through_split = asyncio.run(complete_all(split.base_url, jobs))
    through_mixed = asyncio.run(complete_all(mixed.base_url, jobs))
    for i, (got, want) in enumerate(zip(through_split, through_mixed)):
        assert got == want, f"request {i}: split {got!r} != mixed {want!r}"
    assert sum(n for _, n, _ in through_split) >= 40 * 4
