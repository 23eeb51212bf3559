"""A token or mixed worker that fails a stream after output started (killed, stream cut, stalled,
aborted) costs the client nothing: the router re-runs the prompt phase over prompt + tokens sent,
continues on another worker, and the client sees one stream with the uninterrupted tokens, usage
counted once and the same finish reason. Retries before output use new request ids, skip workers
that failed, and a burst is spread by the router's own in-flight count."""

import asyncio
import json
import logging

import aiohttp
import pytest
from support.fake_worker import MODEL, expected_output
from support.polling import eventually

from phasesplit.router.dispatch import MigrationPolicy

PROMPT = "a stream that must survive the loss of its token worker"
MAX_TOKENS = 24


async def stream(cluster, max_tokens=MAX_TOKENS, **extra) -> tuple[str, str | None, dict | None, dict | None]:
    """(text, finish_reason, usage, error event) of one streaming completion."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    text, finish, usage, error = "", None, None, None
    async with aiohttp.ClientSession() as session, session.post(cluster.base_url + "/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
            elif event.get("usage"):
                usage = event["usage"]
            else:
                text += event["choices"][0]["text"]
                finish = event["choices"][0]["finish_reason"] or finish
    return text, finish, usage, error


def uninterrupted(tokenizer, max_tokens=MAX_TOKENS) -> str:
    return "".join(tokenizer.decode([t]) for t in expected_output(tokenizer.encode(PROMPT), max_tokens))


def migrations(metrics, stage="mid_stream") -> dict[str, float]:
    return {dict(labels)["reason"]: v for (name, labels), v in metrics.items()
            if name == "phasesplit_migrations_total" and dict(labels)["stage"] == stage and v}


@pytest.mark.parametrize("failure,reason", [("kill", "worker_unavailable"), ("end", "stream_ended"),
                                            ("stall", "stalled"), ("abort", "worker_aborted")])
async def test_a_token_worker_failing_mid_stream_is_invisible_to_the_client(make_cluster, tokenizer, caplog,
                                                                            failure, reason):
    cluster = await make_cluster(prompt=1, token=2, worker_options={"token_delay": 0.005})
    first, second = cluster.workers["token"]
    second.num_kv_blocks = 500   # the first one is picked first
    await cluster.polled()
    first.fail_after_tokens, first.failure = 7, failure
    with caplog.at_level(logging.INFO, logger="phasesplit.router.dispatch"):
        text, finish, usage, error = await stream(cluster)
    first.resume()
    assert error is None
    assert text == uninterrupted(tokenizer) and finish == "length"
    assert usage["completion_tokens"] == MAX_TOKENS
    resumed = cluster.workers["prompt"][0].prefills[-1]
    prompt_ids = tokenizer.encode(PROMPT)
    assert resumed.prompt_token_ids[:len(prompt_ids)] == prompt_ids and len(resumed.prompt_token_ids) > len(prompt_ids)
    assert resumed.sampling.max_tokens == MAX_TOKENS - (len(resumed.prompt_token_ids) - len(prompt_ids))
    assert resumed.token_worker == second.address and resumed.request_id.endswith("~1")
    metrics = await cluster.metrics()
    assert migrations(metrics) == {reason: 1}
    assert metrics[("phasesplit_migration_resume_seconds_count", ())] == 1
    assert metrics[("phasesplit_requests_total", (("model_name", MODEL), ("outcome", "success")))] == 1
    assert any(first.address in r.getMessage() and second.address in r.getMessage() for r in caplog.records), \
        "a log line names both workers"


async def test_a_mixed_worker_failing_mid_stream_moves_to_another(make_cluster, tokenizer):
    cluster = await make_cluster(prompt=0, token=0, mixed=2, worker_options={"token_delay": 0.005})
    await cluster.polled()
    for w in cluster.workers["mixed"]:
        w.fail_after_tokens = 5 if w is cluster.workers["mixed"][0] else None
    text, finish, usage, error = await stream(cluster)
    assert error is None and text == uninterrupted(tokenizer) and usage["completion_tokens"] == MAX_TOKENS


async def test_migration_turned_off_ends_the_stream_with_an_error_event(make_cluster, tokenizer):
    cluster = await make_cluster(prompt=1, token=2, migration=MigrationPolicy(max_attempts=0))
    await cluster.polled()
    for w in cluster.workers["token"]:
        w.fail_after_tokens, w.failure = 5, "end"
    text, finish, usage, error = await stream(cluster)
    assert finish is None and error["code"] == "worker_error" and "without a finish reason" in error["message"]
    metrics = await cluster.metrics()
    assert metrics[("phasesplit_requests_lost_total", (("stage", "mid_stream"),))] == 1
    assert metrics[("phasesplit_requests_total", (("model_name", MODEL), ("outcome", "error")))] == 1


@pytest.mark.parametrize("failure", ["kill", "stall"])
async def test_with_no_token_worker_left_the_stream_ends_with_a_clear_error_event(make_cluster, failure):
    cluster = await make_cluster(prompt=1, token=1)
    await cluster.polled()
    cluster.workers["token"][0].fail_after_tokens, cluster.workers["token"][0].failure = 5, failure
    text, finish, usage, error = await stream(cluster)
    assert text and finish is None
    assert error["type"] == "service_unavailable_error"
    assert "lost its worker" in error["message"] and cluster.workers["token"][0].address in error["message"]
    metrics = await cluster.metrics()
    assert metrics[("phasesplit_requests_lost_total", (("stage", "mid_stream"),))] == 1


async def test_a_busy_worker_that_no_other_could_replace_is_waited_for_not_given_up(make_cluster, tokenizer, caplog):
    cluster = await make_cluster(prompt=1, token=1, worker_options={"token_delay": 0.005})   # stall timeout 1 s
    await cluster.polled()
    (worker,) = cluster.workers["token"]
    worker.fail_after_tokens, worker.failure, worker.pause_seconds = 5, "pause", 2.5
    with caplog.at_level(logging.WARNING, logger="phasesplit.router.dispatch"):
        text, finish, usage, error = await stream(cluster)
    assert error is None and text == uninterrupted(tokenizer) and finish == "length"
    assert any("waiting on" in r.getMessage() for r in caplog.records)
    metrics = await cluster.metrics()
    assert migrations(metrics) == {} and metrics[("phasesplit_requests_total", (("model_name", MODEL), ("outcome", "success")))] == 1


async def test_a_stalled_worker_gets_no_new_work_and_its_stream_is_aborted_when_it_resumes(make_cluster, tokenizer):
    cluster = await make_cluster(prompt=1, token=2, worker_options={"token_delay": 0.005})
    first, second = cluster.workers["token"]
    second.num_kv_blocks = 500
    await cluster.polled()
    first.fail_after_tokens, first.failure = 4, "stall"
    text, *_ = await stream(cluster)
    assert text == uninterrupted(tokenizer)
    text, *_ = await stream(cluster)           # the stalled one is not picked again
    assert len(first.generates) == 1 and len(second.generates) == 2
    first.resume()
    await eventually(lambda: not first.active, what="the stalled stream to be cancelled")


async def test_a_prompt_worker_dead_before_output_is_skipped_and_not_picked_again(make_cluster, tokenizer):
    cluster = await make_cluster(prompt=2, token=1)
    await cluster.polled()
    dead, alive = cluster.workers["prompt"]
    await dead.kill()
    for _ in range(4):
        text, *_ = await stream(cluster, max_tokens=6)
        assert text == uninterrupted(tokenizer, 6)
    assert len(alive.prefills) == 4
    metrics = await cluster.metrics()
    # tried at most once (unless a poll found it dead first), then known dead until a poll answers again
    assert migrations(metrics, "before_output") in ({}, {"prompt_worker_unavailable": 1})


async def test_a_retry_after_an_aborted_first_attempt_works_with_a_single_token_worker(make_cluster, tokenizer):
    cluster = await make_cluster(prompt=2, token=1)
    dying, other = cluster.workers["prompt"]
    dying.fail_after_push = True          # pushes the KV, then fails as a worker dying right then does
    other.extra_waiting_tokens = 10_000   # so that the dying one is picked first
    await cluster.polled()
    text, finish, usage, error = await stream(cluster, max_tokens=6)
    assert error is None and text == uninterrupted(tokenizer, 6)
    assert len(dying.prefills) == len(other.prefills) == 1
    first, retry = dying.prefills[0].request_id, other.prefills[0].request_id
    assert retry != first, "the token worker refuses KV for the aborted first attempt's id"
    token = cluster.workers["token"][0]
    await eventually(lambda: first in token.tombstones, what="the first attempt's abort")


async def test_a_burst_is_spread_over_idle_token_workers_by_in_flight_count(make_cluster):
    cluster = await make_cluster(prompt=1, token=2, worker_options={"token_delay": 0.01})
    cluster.workers["token"][0].num_kv_blocks = 1100   # both have ample room; one polls a little freer
    await cluster.polled()
    await asyncio.gather(*(stream(cluster, max_tokens=12) for _ in range(16)))
    assert sorted(len(w.generates) for w in cluster.workers["token"]) == [8, 8]
