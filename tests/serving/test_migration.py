"""Faults under real processes in local mode: a token worker SIGKILLed or SIGSTOPped under concurrent
long streams costs no stream a token (exactly the text of an uninterrupted run, greedy and seeded),
clients closing streams during it leave every KV block free, a prompt worker killed during prefills
and KV transfers costs no request, and local mode replaces a dead router as it replaces a dead worker."""

import asyncio
import os
import random
import signal
import time
import urllib.request

import httpx
import pytest
from support import prom
from support.polling import poll, wait_for
from support.completions import MAX_TOKENS, body, stream
from support.serving import STALL_TIMEOUT, metrics, wait_pool_restored, wait_quiet, worker_load
from support.words import WORDS

pytestmark = pytest.mark.slow

def kv_used(address: str) -> int:
    return worker_load(address).kv_blocks_used


def migrated(base_url: str) -> float:
    return prom.value(metrics(base_url), "phasesplit_migrations_total", stage="mid_stream")


async def run_fault(split, mixed, fault, n: int = 16, cancelled: int = 0, max_tokens: int = 3 * MAX_TOKENS) -> None:
    """n streams through `split` (and `cancelled` more that their clients close at random points) while
    `fault()` hits once every stream has output; each must equal the same request on `mixed`, uninterrupted.
    The streams are long, and the reference runs only afterwards: a loaded machine's client reads the
    first tokens late, and the fault must still find streams running."""
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        progress = [[0] for _ in range(n + cancelled)]
        rng = random.Random(5)
        runs = [stream(client, split.base_url, body(i, max_tokens), progress[i]) for i in range(n)]
        runs += [stream(client, split.base_url, body(100 + i), progress[n + i], close_after=rng.randint(1, 60))
                 for i in range(cancelled)]
        runs = asyncio.gather(*runs)
        # every stream has output (a sampled one's text comes in fewer, longer chunks)
        while min(p[0] for p in progress[:n]) < 1 or sum(p[0] for p in progress[:n]) < 5 * n:
            await asyncio.sleep(0.05)
        fault()
        got = await runs
        want = await asyncio.gather(*(stream(client, mixed.base_url, body(i, max_tokens)) for i in range(n)))
    for i in range(n):
        assert got[i] == (want[i][0], "length", max_tokens), f"stream {i}: {got[i]!r} != {want[i]!r}"


def busiest_token_worker(split):
    """The token worker running the most requests now: the one whose loss the test is about."""
    return max(split.workers["token"], key=lambda w: worker_load(w.address).running_requests)


def test_sigkill_of_a_token_worker_under_16_long_streams_costs_no_token(split, mixed):
    before = migrated(split.base_url)
    asyncio.run(run_fault(split, mixed, lambda: os.kill(busiest_token_worker(split).proc.pid, signal.SIGKILL),
                          cancelled=6))
    assert migrated(split.base_url) - before >= 1
    wait_pool_restored(split, "token", 2)
    state = wait_quiet(split, timeout=20)
    assert all(v == (0, 0, 0, 0) for k, v in state.items() if k != "router inflight"), state


def test_a_sigstopped_token_worker_is_migrated_and_frees_its_blocks_after_sigcont(split, mixed):
    stopped = []

    def stop():
        victim = busiest_token_worker(split)
        os.kill(victim.proc.pid, signal.SIGSTOP)
        stopped.append((victim, time.monotonic()))

    before = migrated(split.base_url)
    try:
        asyncio.run(run_fault(split, mixed, stop, n=8))
    finally:
        for victim, _ in stopped:
            os.kill(victim.proc.pid, signal.SIGCONT)
    victim, stopped_at = stopped[0]
    assert time.monotonic() - stopped_at >= STALL_TIMEOUT and migrated(split.base_url) - before >= 1
    used = poll(lambda: kv_used(victim.address), lambda used: used == 0, timeout=30, interval=0.2)
    assert used == 0, "the stalled worker's streams were cancelled: it frees their blocks once it runs again"
    state = wait_quiet(split, timeout=20)
    assert all(v == (0, 0, 0, 0) for k, v in state.items() if k != "router inflight"), state


def test_a_prompt_worker_killed_during_prefills_and_transfers_costs_no_request(split, mixed):
    victim = split.workers["prompt"][0]

    async def run():
        long_bodies = [body(200 + i, 8) | {"prompt": " ".join(WORDS * 12)[: 3000 + 50 * i]} for i in range(8)]
        async with httpx.AsyncClient(timeout=300) as client:
            jobs = [asyncio.create_task(stream(client, split.base_url, b)) for b in long_bodies]
            await asyncio.sleep(0.3)     # prefills queued and running, layers on their way
            os.kill(victim.proc.pid, signal.SIGKILL)
            got = await asyncio.gather(*jobs)
            want = await asyncio.gather(*(stream(client, mixed.base_url, b) for b in long_bodies))
        assert got == want

    asyncio.run(run())
    wait_pool_restored(split, "prompt", 2)


def test_local_mode_replaces_a_dead_router(split):
    os.kill(split.router.pid, signal.SIGKILL)

    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"{split.base_url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False
    wait_for(answers, timeout=90, interval=0.5, what="a new router")
    wait_pool_restored(split, "token", 2)
