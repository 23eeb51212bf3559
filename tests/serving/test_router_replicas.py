"""Faults seen through a second router replica over the session cluster's pools (as two router Pods
behind one Service; like a router Pod, it has no model directory and reads the tokenizer from a
worker, and answers a chat as the first does): a router SIGKILLed mid-stream costs the client one retry, which the other
replica answers with the text an uninterrupted run gives; a token worker SIGKILLed while a prompt
worker pushes KV to it neither hangs the prompt side nor fails the request, and no block leaks."""

import asyncio
import contextlib
import json
import os
import signal
import time
import urllib.request

import httpx
import openai
import pytest
from support import prom
from support.polling import eventually, wait_for
from support.completions import body, stream
from support.serving import another_router, metrics, wait_pool_restored, wait_quiet
from support.words import WORDS


pytestmark = pytest.mark.slow

ADMIN_TOKEN = "second-router-admin"
KV_TRANSFER_TIMEOUT = 10.0   # kvTransfer.timeoutSeconds of the session clusters (support.serving.manifest)


@pytest.fixture(scope="module")
def second_router_proc(clusters, tmp_path_factory):
    with another_router(clusters[0], "router-2", tmp_path_factory.mktemp("router-2"),
                        env={"PHASESPLIT_ADMIN_TOKEN": ADMIN_TOKEN}, without_model=True) as url:
        yield url


@pytest.fixture
def second_router(split, second_router_proc):
    """The second router's base URL, given the pools' current members (earlier tests replaced workers)."""
    for pool in split.plan.pools:
        data = json.dumps({"workers": split.addresses(pool)}).encode()
        request = urllib.request.Request(f"{second_router_proc}/admin/pools/{pool}", data=data, method="PUT",
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": f"Bearer {ADMIN_TOKEN}"})
        urllib.request.urlopen(request, timeout=10).close()
    wait_for(lambda: all(len(routable(second_router_proc, pool)) == len(split.addresses(pool))
                         for pool in split.plan.pools), timeout=30, what="the second router's workers")
    return second_router_proc


def pools(base_url: str) -> dict:
    with urllib.request.urlopen(f"{base_url}/admin/pools", timeout=5) as reply:
        return json.loads(reply.read())


def routable(base_url: str, pool: str) -> list[dict]:
    return [w for w in pools(base_url)[pool]["workers"] if w["routable"]]


def test_a_router_without_the_model_answers_a_chat_as_one_with_it(split, second_router):
    request = {"model": "tiny", "messages": [{"role": "user", "content": " ".join(WORDS[:12])}], "max_tokens": 12,
               "temperature": 0}
    answers = []
    for url in (split.base_url, second_router):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(**request)
        answers.append((reply.choices[0].message.content, reply.usage.prompt_tokens))
        client.close()
    assert answers[0] == answers[1] and answers[0][1] > 12
    wait_for(lambda: sum(sum((w["streams_ended"] or {}).values()) for w in pools(second_router)["token"]["workers"])
             >= 2, timeout=10, what="the token workers' ended streams in /admin/pools")


def test_a_client_retries_on_the_other_router_when_one_dies_mid_stream(split, mixed, second_router):
    # Long enough that the router is still streaming when a loaded machine's client reads chunk 4.
    request = {"model": "tiny", "prompt": " ".join(WORDS[:40]), "max_tokens": 1200, "temperature": 0,
               "extra_body": {"ignore_eos": True}}
    replicas = [openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
                for url in (split.base_url, second_router)]
    want = openai.OpenAI(base_url=mixed.endpoint, api_key="unused").completions.create(**request).choices[0].text
    seen = ""
    with pytest.raises((openai.APIError, httpx.HTTPError)):   # the stream breaks: the router is gone
        for n, chunk in enumerate(replicas[0].completions.create(**request, stream=True)):
            seen += chunk.choices[0].text
            if n == 4:
                os.kill(split.router.pid, signal.SIGKILL)
    assert want.startswith(seen) and len(seen) < len(want)
    again = "".join(c.choices[0].text for c in replicas[1].completions.create(**request, stream=True))
    assert again == want, "the retry on the other replica gives the uninterrupted text"
    wait_for(lambda: split.router.alive() and _answers(split.base_url), timeout=60, what="a new first router")
    state = wait_quiet(split, timeout=20)   # the dead router's stream was cancelled on its workers
    assert all(v == (0, 0, 0, 0) for k, v in state.items() if k != "router inflight"), state


def _answers(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def test_a_token_worker_killed_while_receiving_kv_costs_no_request(split, mixed, second_router):
    retried = lambda: prom.value(metrics(second_router), "phasesplit_migrations_total",  # noqa: E731
                                 reason="kv_transfer_failed", stage="before_output")
    before = retried()
    long_body = body(300, 8) | {"prompt": " ".join(WORDS * 12)[:3000]}
    victim = []

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            # a long stream keeps one token worker busy, so the next request goes to the other: the victim
            hold = asyncio.create_task(stream(client, second_router, body(301, 1500)))
            busy = await eventually(lambda: [w for w in routable(second_router, "token") if w["inflight"]],
                                    timeout=30, what="the long stream on a token worker")
            address = next(w["address"] for w in routable(second_router, "token") if w["address"] != busy[0]["address"])
            victim.append(next(h for h in split.workers["token"] if h.address == address))
            os.kill(victim[0].proc.pid, signal.SIGSTOP)   # it accepts the connection, reads nothing
            job = asyncio.create_task(stream(client, second_router, long_body))
            await eventually(lambda: next(w for w in pools(second_router)["token"]["workers"]
                                          if w["address"] == address)["inflight"], timeout=5,
                             what="the request on the stopped token worker")
            await asyncio.sleep(1.0)   # prefilled; its KV is on the way to the stopped worker
            os.kill(victim[0].proc.pid, signal.SIGKILL)
            killed = time.monotonic()
            got = await job
            hold.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await hold
            return got, time.monotonic() - killed

    try:
        (got, after_kill) = asyncio.run(run())
    finally:
        if victim and victim[0].proc.alive():
            os.kill(victim[0].proc.pid, signal.SIGKILL)
    want = asyncio.run(_reference(mixed.base_url, long_body))
    assert got == want and got[1] == "length"
    assert after_kill < KV_TRANSFER_TIMEOUT, "the prompt side waited on the dead worker"
    assert retried() - before == 1, "retried once, with the other token worker"
    wait_pool_restored(split, "token", 2)
    state = wait_quiet(split, timeout=20)
    assert all(v == (0, 0, 0, 0) for k, v in state.items() if k != "router inflight"), state


async def _reference(base_url: str, request: dict):
    async with httpx.AsyncClient(timeout=120) as client:
        return await stream(client, base_url, request)
