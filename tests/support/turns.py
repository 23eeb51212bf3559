"""Greedy chat turns through a router, with what each one's KV transfer moved (the router's /metrics)."""

from __future__ import annotations

import openai
from support import prom
from support.serving import metrics
from support.words import WORDS

TRANSFER = ("phasesplit_kv_transfer_bytes_total", "phasesplit_kv_blocks_sent_total", "phasesplit_kv_blocks_held_total")


def words(seed: int, n: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(n))


def conversation(seed: int) -> list[dict]:
    """A conversation's first turn: a system prompt and a user message."""
    return [{"role": "system", "content": f"conversation {seed}: " + words(seed, 60)},
            {"role": "user", "content": "turn 1: " + words(seed + 1, 12)}]


def transfer_counts(base_url: str) -> tuple[float, ...]:
    samples = metrics(base_url)
    return tuple(prom.value(samples, name) for name in TRANSFER)


def turn(base_url: str, history: list[dict], salt: str) -> tuple[str, tuple[float, ...]]:
    """One greedy chat turn: its text, and what its KV transfer moved (bytes, blocks sent, blocks held)."""
    before = transfer_counts(base_url)
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        reply = client.chat.completions.create(model="tiny", messages=history, max_tokens=8, temperature=0,
                                               extra_body={"cache_salt": salt, "ignore_eos": True})
    after = transfer_counts(base_url)
    return reply.choices[0].message.content, tuple(a - b for a, b in zip(after, before))
