"""A burst of streaming completions at a small split cluster whose router admits only what its token
worker's batch can start within `maxQueueWaitSeconds`: each request is served to its end or refused
with a 429 (shared by tests/serving/test_overload.py and bench/overload.py)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx

from support.serving import manifest

BATCH = 16  # the token worker's maxNumSeqs: what can decode at once


def overload_manifest(name: str, max_queue_wait: float) -> dict:
    doc = manifest(name, {"prompt": 1, "token": 1})
    for pool in doc["spec"]["pools"].values():
        pool["engine"] = pool["engine"] | {"maxNumSeqs": BATCH}
    doc["spec"]["router"]["admission"] = {"maxQueueWaitSeconds": max_queue_wait}
    return doc


@dataclass
class Outcome:
    status: int
    seconds: float            # from sending to the last byte (served) or to the refusal
    tokens: int = 0           # completion tokens the usage reported
    retry_after: str | None = None
    first_token: float | None = None   # seconds from sending to the first token (served)


async def one(client: httpx.AsyncClient, base_url: str, i: int, max_tokens: int) -> Outcome:
    body = {"model": "tiny", "prompt": f"request {i} of the burst " * 4, "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.monotonic()
    async with client.stream("POST", f"{base_url}/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            await reply.aread()
            return Outcome(reply.status_code, time.monotonic() - start, retry_after=reply.headers.get("Retry-After"))
        tokens, first_token = 0, None
        async for line in reply.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
                first_token = first_token or time.monotonic() - start
        return Outcome(200, time.monotonic() - start, tokens, first_token=first_token)


async def burst(base_url: str, n: int, max_tokens: int) -> list[Outcome]:
    limits = httpx.Limits(max_connections=n + 8)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(*(one(client, base_url, i, max_tokens) for i in range(n)))
