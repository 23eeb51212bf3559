"""Clients of a serving cluster as users write them: the official `openai` client and raw streaming
completions over httpx, with prompts drawn from a fixed word list."""

import asyncio
import json
import random

import httpx
import openai

from support.words import WORDS

MAX_TOKENS = 160


def body(i: int, max_tokens: int = MAX_TOKENS) -> dict:
    rng = random.Random(i)
    body = {"model": "tiny", "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))),
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    return body | ({"temperature": 0} if i % 2 == 0 else {"temperature": 1.0, "seed": 1000 + i})


async def stream(client: httpx.AsyncClient, base_url: str, body: dict, progress: list[int] | None = None,
                 close_after: int | None = None) -> tuple[str, str | None, int | None]:
    """(text, finish reason, usage completion tokens); `progress[0]` counts chunks as they come."""
    text, finish, usage = "", None, None
    async with client.stream("POST", f"{base_url}/v1/completions", json=body) as reply:
        assert reply.status_code == 200, await reply.aread()
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
                continue
            text += event["choices"][0]["text"]
            finish = event["choices"][0]["finish_reason"] or finish
            if progress is not None:
                progress[0] += 1
                if close_after is not None and progress[0] >= close_after:
                    return text, None, None
    return text, finish, usage


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
