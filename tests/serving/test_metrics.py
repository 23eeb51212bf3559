"""The router's /metrics after real traffic: parseable, every documented name, real values."""

import pathlib
import re

import pytest
from support.prom import value
from support.serving import metrics, post_json, wait_quiet

pytestmark = pytest.mark.slow

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def documented_names() -> list[str]:
    section = DOC.read_text().split("## Metrics the autoscaler reads", 1)[1]
    return sorted(set(re.findall(r"`(phasesplit_[a-z_]+)`", section)))


def test_metrics_carry_every_documented_name_with_real_values(split):
    for i in range(3):
        status, _ = post_json(f"{split.base_url}/v1/completions",
                              {"model": "tiny", "prompt": f"metrics {i} " * 20, "max_tokens": 6, "ignore_eos": True})
        assert status == 200
    wait_quiet(split, timeout=5)
    samples = metrics(split.base_url)
    names = documented_names()
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
