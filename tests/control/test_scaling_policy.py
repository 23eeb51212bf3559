"""The scaling policy as tables: each row is a sequence of evaluations and what they must decide."""

import pytest

import pydantic
from support.examples import split_inference

from phasesplit.control.scaling import (Decision, PoolMetrics, PoolScaler, PoolState, SplitScaler, apply_ratio,
                                        decide)
from phasesplit.control.spec import PoolAutoscaling, PromptToTokenRatio, SplitInferenceSpec

QT = "queueTokens"


def knobs(**kw):
    base = dict(min_replicas=1, max_replicas=10, metric=QT, target_per_replica=100,
                scale_up_max_step=4, scale_down_stabilization_seconds=60, cooldown_seconds=0)
    return PoolAutoscaling(**{**base, **kw})


def run(k, steps, current=1, interval=15.0):
    """Evaluate `steps` (metric values, None = missing) `interval` seconds apart, applying each decision."""
    state, out = PoolState(), []
    for i, value in enumerate(steps):
        d = decide(k, PoolMetrics(**{"queue_tokens": value}), current, state, now=1000.0 + i * interval)
        out.append(d.desired)
        current = d.desired
    return out


@pytest.mark.parametrize("k, steps, expected", [
    # a burst of 800 queued tokens at 100/replica: 1 -> 5 in one evaluation (step 4), then 8
    (knobs(), [0, 800, 800], [1, 5, 8]),
    (knobs(scale_up_max_step=10), [0, 800], [1, 8]),
    # capped by max_replicas
    (knobs(max_replicas=3, scale_up_max_step=10), [5000], [3]),
    # within 10% of the target: no change
    (knobs(), [105, 95, 109], [1, 1, 1]),
], ids=["burst-step-4", "burst-one-evaluation", "max-bound", "tolerance"])
def test_scale_up(k, steps, expected):
    assert run(k, steps) == expected


def test_oscillating_load_does_not_flap():
    # load alternates every 15 s between 600 and 100 tokens: the pool grows once and stays
    k = knobs(scale_down_stabilization_seconds=120, scale_up_max_step=10)
    out = run(k, [600, 100] * 6)
    assert out == [6] * 12
    # the same load without a window flaps on every evaluation: the window is what holds it
    assert run(knobs(scale_down_stabilization_seconds=0, scale_up_max_step=10), [600, 100] * 3) == [6, 1] * 3


def test_stabilization_window_delays_scale_down_by_the_window():
    # 600 tokens once, then idle: stays at 6 until the 60 s window no longer holds the 6, then goes to min
    out = run(knobs(scale_down_stabilization_seconds=60, scale_up_max_step=10), [600, 0, 0, 0, 0, 0], interval=15)
    assert out == [6, 6, 6, 6, 1, 1]


def test_scale_down_follows_the_highest_recommendation_in_the_window():
    out = run(knobs(scale_down_stabilization_seconds=30, scale_up_max_step=10), [800, 400, 200, 200, 200], interval=15)
    assert out == [8, 8, 4, 2, 2]


@pytest.mark.parametrize("cooldown, expected", [
    (0, [5, 9, 10]),
    (40, [5, 5, 5, 9]),  # 15 s apart: the second change waits until 45 s > 40 s
], ids=["no-cooldown", "cooldown-40s"])
def test_cooldown_blocks_changes_after_a_change(cooldown, expected):
    k = knobs(cooldown_seconds=cooldown, max_replicas=10)
    out = run(k, [2000] * len(expected), interval=15)
    assert out == expected


@pytest.mark.parametrize("current, expected, word", [(0, 2, "outside"), (12, 10, "outside"), (5, 5, "missing")])
def test_missing_metric_keeps_current_but_bounds_still_hold(current, expected, word):
    k = knobs(min_replicas=2)
    d = decide(k, PoolMetrics(), current, PoolState(), now=0.0)
    assert d.desired == expected and word in d.reason
    assert d.metric_value is None


def test_missing_metric_changes_nothing_for_every_metric():
    for metric in ("queueTokens", "queueRequests", "inflightRequests", "kvUtilization"):
        k = knobs(metric=metric, target_per_replica=0.8 if metric == "kvUtilization" else 100)
        d = decide(k, PoolMetrics(queue_tokens=None), 4, PoolState(), now=0.0)
        assert (d.desired, d.changed) == (4, False)
        assert f"{metric} missing" in d.reason


@pytest.mark.parametrize("metric, field, value, target, current, expected", [
    ("queueRequests", "queue_requests", 9, 4, 1, 3),          # a total: ceil(9 / 4)
    ("inflightRequests", "inflight_requests", 40, 8, 2, 5),   # a total: ceil(40 / 8)
    ("kvUtilization", "kv_utilization", 0.9, 0.6, 2, 3),      # an average: ceil(2 * 0.9 / 0.6)
    ("kvUtilization", "kv_utilization", 0.2, 0.4, 4, 2),      # an average: ceil(4 * 0.2 / 0.4)
])
def test_each_metric(metric, field, value, target, current, expected):
    k = knobs(metric=metric, target_per_replica=target, scale_up_max_step=10, scale_down_stabilization_seconds=0)
    d = decide(k, PoolMetrics(**{field: value}), current, PoolState(), now=0.0)
    assert d.desired == expected, d.reason


@pytest.mark.parametrize("slo_field, metrics_field, p90, expected", [
    ("ttft_slo_seconds", "ttft_p90_seconds", 2.0, 4),   # SLO missed: one more despite an empty queue
    ("ttft_slo_seconds", "ttft_p90_seconds", 0.2, 1),   # SLO met: empty queue scales down to min
    ("tbt_slo_seconds", "tbt_p90_seconds", 0.5, 4),
    ("tbt_slo_seconds", "tbt_p90_seconds", None, 1),    # no SLO figure: the queue decides
])
def test_slo_miss_adds_a_replica_and_forbids_scale_down(slo_field, metrics_field, p90, expected):
    k = knobs(scale_down_stabilization_seconds=0, **{slo_field: 0.5 if "ttft" in slo_field else 0.1})
    m = PoolMetrics(queue_tokens=0, **{metrics_field: p90})
    d = decide(k, m, 3, PoolState(), now=0.0)
    assert d.desired == expected, d.reason
    if expected == 4:
        assert "SLO" in d.reason


def d(desired, current=1):
    return Decision(desired, current, QT, 0.0, "r", 0.0)


@pytest.mark.parametrize("bounds, p, t, expected", [
    (PromptToTokenRatio(min=0.5, max=2.0), 1, 4, (2, 4)),   # too few prompt workers: raise prompt
    (PromptToTokenRatio(min=0.5, max=2.0), 6, 2, (6, 3)),   # too few token workers: raise token
    (PromptToTokenRatio(min=0.5, max=2.0), 2, 2, (2, 2)),
    (PromptToTokenRatio(min=1.0), 1, 9, (5, 9)),            # wanted 9 prompt, capped at prompt max 5
    (PromptToTokenRatio(), 1, 9, (1, 9)),
])
def test_ratio_bounds_raise_the_smaller_side(bounds, p, t, expected):
    small = knobs(max_replicas=5)
    got_p, got_t = apply_ratio(d(p), d(t), bounds, small, knobs())
    assert (got_p.desired, got_t.desired) == expected
    if expected != (p, t):
        assert "prompt:token" in (got_p.reason + got_t.reason)


def test_split_scaler_scales_pools_independently_from_the_spec():
    doc = split_inference(spec={"pools": {
        "prompt": {"autoscaling": {"minReplicas": 1, "maxReplicas": 4, "metric": "queueTokens",
                                   "targetPerReplica": 512, "cooldownSeconds": 0, "scaleUpMaxStep": 4}},
        "token": {"autoscaling": {"minReplicas": 1, "maxReplicas": 4, "metric": "inflightRequests",
                                  "targetPerReplica": 8}}},
        "autoscaling": {"mode": "builtin", "promptToTokenRatio": {"min": 0.25, "max": 4}}})
    s = SplitScaler.from_spec(SplitInferenceSpec.model_validate(doc["spec"]))
    out = s.evaluate({"prompt": PoolMetrics(queue_tokens=2000), "token": PoolMetrics(inflight_requests=3)},
                     {"prompt": 1, "token": 1}, now=0.0)
    assert (out["prompt"].desired, out["token"].desired) == (4, 1)
    restored = PoolState.from_dict(s.states()["prompt"])
    assert restored.recommendations == [(0.0, 4)] and restored.last_change_time == 0.0


@pytest.mark.parametrize("autoscaling, field", [
    ({"metric": "latency"}, "metric"),
    ({"minReplicas": 3, "maxReplicas": 2}, "maxReplicas"),
    ({"targetPerReplica": 0}, "targetPerReplica"),
    ({"scaleUpMaxStep": 0}, "scaleUpMaxStep"),
    ({"ttftSloSeconds": -1}, "ttftSloSeconds"),
])
def test_bad_knobs_name_the_field(autoscaling, field):
    with pytest.raises(pydantic.ValidationError, match=field):
        PoolAutoscaling.model_validate({"maxReplicas": 4, **autoscaling})


def test_pool_scaler_keeps_state_between_calls():
    s = PoolScaler(knobs(cooldown_seconds=100))
    assert s.evaluate(PoolMetrics(queue_tokens=300), 1, now=0).desired == 3
    assert s.evaluate(PoolMetrics(queue_tokens=900), 3, now=10).desired == 3  # cooldown holds
    assert s.evaluate(PoolMetrics(queue_tokens=900), 3, now=101).desired == 7


def test_split_scaler_from_the_pydantic_spec_uses_its_defaults():
    doc = split_inference()
    s = SplitScaler.from_spec(SplitInferenceSpec.model_validate(doc["spec"]))
    assert set(s.pools) == {"prompt", "token"}
    prompt = s.pools["prompt"].knobs
    assert (prompt.metric, prompt.target_per_replica, prompt.max_replicas) == ("queueTokens", 512, 3)
    assert (prompt.scale_up_max_step, prompt.cooldown_seconds) == (2, 60)   # spec defaults


def test_deletion_costs_put_the_least_loaded_worker_first():
    pods = {"tiny-token-a": "10.0.0.7", "tiny-token-b": "10.0.0.8", "tiny-token-c": "10.0.0.9"}
    load = {"10.0.0.7:50051": 40, "10.0.0.8:50051": 3}
    from phasesplit.control.scaling import deletion_costs
    costs = deletion_costs(pods, load)
    assert costs == {"tiny-token-a": 40, "tiny-token-b": 3, "tiny-token-c": 0}
    assert min(costs, key=costs.get) == "tiny-token-c"


def test_the_history_kept_in_status_stays_small_however_often_a_pool_is_evaluated():
    import json
    import random

    from phasesplit.control.scaling import _remember
    rng = random.Random(7)
    state, full = PoolState(), []
    for tick in range(3000):
        raw = rng.randint(1, 8)
        _remember(state, float(tick), raw, window=300.0)
        full = [(t, r) for t, r in full if tick - t < 300.0] + [(float(tick), raw)]
        assert max(r for _, r in state.recommendations) == max(r for _, r in full)
    assert len(state.recommendations) <= 8
    assert len(json.dumps(state.to_dict())) < 400


@pytest.mark.parametrize("k, metrics, expected", [
    # one request waits in the router for the empty pool: 0 -> 1, even in cooldown after the scale-down
    (knobs(min_replicas=0, cooldown_seconds=600), PoolMetrics(queue_requests=1, queue_tokens=20), 1),
    # a burst: the primary metric's recommendation, capped by the step
    (knobs(min_replicas=0), PoolMetrics(queue_requests=9, queue_tokens=900), 4),
    # an average metric (no worker: 0) or a missing primary metric does not keep the pool at 0
    (knobs(min_replicas=0, metric="kvUtilization", target_per_replica=0.8),
     PoolMetrics(queue_requests=2, kv_utilization=0.0), 1),
    (knobs(min_replicas=0), PoolMetrics(queue_requests=1), 1),
    # nothing held: the pool stays at 0
    (knobs(min_replicas=0), PoolMetrics(queue_requests=0, queue_tokens=0, inflight_requests=0), 0),
], ids=["one-request-in-cooldown", "burst", "average-metric", "primary-missing", "no-demand"])
def test_a_pool_at_zero_with_requests_waiting_scales_from_zero(k, metrics, expected):
    state = PoolState(last_change_time=1000.0)
    d = decide(k, metrics, 0, state, now=1010.0)
    assert d.desired == expected
    if expected:
        assert "scale from zero" in d.reason


def test_a_pool_scales_to_zero_only_once_nothing_is_held_for_it():
    k = knobs(min_replicas=0, scale_down_stabilization_seconds=0)
    state = PoolState()
    streaming = PoolMetrics(queue_requests=0, queue_tokens=0, inflight_requests=2)
    assert decide(k, streaming, 1, state, now=1000.0).desired == 1
    idle = PoolMetrics(queue_requests=0, queue_tokens=0, inflight_requests=0)
    assert decide(k, idle, 1, state, now=1001.0).desired == 0
