"""The router's and the workers' /metrics after real traffic: parseable, every documented name, real values."""

import pathlib
import re
import urllib.request

import pytest
from support.prom import parse, value
from support.polling import poll
from support.serving import metrics, post_json, wait_quiet

pytestmark = pytest.mark.slow

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def documented_names(heading: str) -> list[str]:
    section = DOC.read_text().split(heading, 1)[1].split("\n## ", 1)[0]
    return sorted(set(re.findall(r"`(phasesplit_[a-z_]+)`", section)))


def test_metrics_carry_every_documented_name_with_real_values(split):
    before = metrics(split.base_url)  # the session's cluster has served other tests' requests
    for i in range(3):
        status, _ = post_json(f"{split.base_url}/v1/completions",
                              {"model": "tiny", "prompt": f"metrics {i} " * 20, "max_tokens": 6, "ignore_eos": True})
        assert status == 200
    wait_quiet(split, timeout=5)
    # the workers' own stream counts reach the router with its next poll of them
    samples = poll(lambda: metrics(split.base_url),
                   lambda m: value(m, "phasesplit_worker_streams_ended_total") >= 3, timeout=10)
    names = documented_names("## Metrics the autoscaler reads")
    assert len(names) >= 13
    for name in names:
        base = name.removesuffix("_total")
        assert any(s == name or s.startswith(base) for s, _ in samples), f"{name} missing from /metrics"

    assert value(samples, "phasesplit_requests_total", outcome="success") >= 3
    assert value(samples, "phasesplit_pool_workers", pool="prompt") == 2
    assert value(samples, "phasesplit_pool_workers", pool="token") == 2
    assert value(samples, "phasesplit_kv_transfer_bytes_total") > 0
    assert value(samples, "phasesplit_kv_transfer_seconds_total") > 0
    assert value(samples, "phasesplit_time_to_first_token_seconds_count") >= 3
    assert value(samples, "phasesplit_time_between_tokens_seconds_count") >= 3 * 5
    assert value(samples, "phasesplit_request_latency_seconds_count") >= 3
    free = {dict(labels)["worker"]: v for (name, labels), v in samples.items() if name == "phasesplit_kv_blocks_free"}
    assert set(free) >= set(split.addresses("token"))
    assert all(v > 0 for v in free.values())
    assert value(samples, "phasesplit_inflight_requests") == 0
    assert value(samples, "phasesplit_prompt_tokens_total", model_name="tiny") > 3 * 20
    generated = value(samples, "phasesplit_generation_tokens_total", model_name="tiny") - value(
        before, "phasesplit_generation_tokens_total", model_name="tiny")
    assert generated == 3 * 6
    assert value(samples, "phasesplit_time_to_first_token_seconds_count", pool="prompt") >= 3
    assert value(samples, "phasesplit_request_latency_seconds_count", pool="token") >= 3


def test_every_worker_exports_its_engine_metrics(split):
    names = documented_names("## Worker metrics")
    assert len(names) >= 6
    for address in split.metrics_addresses():
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
            samples = parse(reply.read().decode())
        for name in names:
            assert any(s == name for s, _ in samples), f"{name} missing from {address}/metrics"
        assert value(samples, "phasesplit_worker_kv_blocks_free", model_name="tiny") > 0
        assert 0 <= value(samples, "phasesplit_worker_kv_usage") <= 1
        assert {dict(labels)["role"] for (_, labels) in samples} <= {"prompt", "token"}
