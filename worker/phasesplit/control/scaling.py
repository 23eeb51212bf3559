"""The scaling policy for the prompt and token pools: pure, deterministic, no I/O.

One evaluation per pool takes the pool's knobs, its current metrics, its current replica count
and a small history (`PoolState`), and returns a `Decision`. The operator's timer and local mode
both call it; `PoolScaler` and `SplitScaler` hold the state for callers that keep it in memory.

The rules, in order:
  1. scale from zero: a pool at 0 replicas that the router holds requests for (queueRequests or
     inflightRequests above 0: they wait in the router's queue for an empty pool) goes to at least 1
     at once, with no cooldown and whether or not the primary metric is there;
  2. the primary metric is missing: keep the current count (reason says so);
  3. raw recommendation, as HPA does: totals (queue, in-flight) give ceil(value / target);
     kvUtilization is a pool average and gives ceil(current * value / target); within
     `TOLERANCE` of the target nothing changes;
  4. an SLO miss (TTFT or TBT P90 above its target) asks for at least one more replica and
     forbids a scale-down;
  5. scale-up is capped at `scale_up_max_step` replicas per evaluation (a burst goes in one step);
  6. scale-down uses the highest recommendation seen within the stabilization window;
  7. no change within `cooldown_seconds` of the previous change;
  8. the result is clamped to [min_replicas, max_replicas] (a count outside the bounds is brought
     back even during a cooldown), and a pool never goes to 0 while requests are held for it;
  9. across pools, `SplitScaler` raises the smaller side to keep prompt:token within its bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from phasesplit.control.spec import PoolAutoscaling, PromptToTokenRatio, SplitInferenceSpec

AVERAGE_METRICS = ("kvUtilization",)
TOLERANCE = 0.1


@dataclass(frozen=True, slots=True)
class PoolMetrics:
    """What the router reports about one pool; None means the metric was not available."""
    queue_requests: float | None = None
    queue_tokens: float | None = None
    inflight_requests: float | None = None
    kv_utilization: float | None = None
    ttft_p90_seconds: float | None = None
    tbt_p90_seconds: float | None = None

    def value(self, metric: str) -> float | None:
        return getattr(self, metric_field(metric))


@dataclass(slots=True)
class PoolState:
    """History one pool's evaluations need; `to_dict`/`from_dict` make it fit in status or JSON."""
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    last_change_time: float | None = None

    def to_dict(self) -> dict:
        return {"recommendations": [list(r) for r in self.recommendations], "lastChangeTime": self.last_change_time}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> PoolState:
        data = data or {}
        recs = [(float(t), int(n)) for t, n in data.get("recommendations", [])]
        return cls(recommendations=recs, last_change_time=data.get("lastChangeTime"))


@dataclass(frozen=True, slots=True)
class Decision:
    desired: int
    current: int
    metric: str
    metric_value: float | None
    reason: str
    time: float

    @property
    def changed(self) -> bool:
        return self.desired != self.current

    def to_status(self) -> dict:
        """The `status.autoscaling.<pool>` entry (time as seconds since the epoch)."""
        return {"desired": self.desired, "current": self.current, "metric": self.metric,
                "value": self.metric_value, "reason": self.reason, "time": self.time}


def decide(knobs: PoolAutoscaling, metrics: PoolMetrics, current: int, state: PoolState, now: float) -> Decision:
    """One evaluation of one pool; updates `state` in place (history and last change)."""
    value = metrics.value(knobs.metric)
    desired, reason = _recommend(knobs, metrics, value, current, state, now)
    if desired != current:
        state.last_change_time = now
    return Decision(desired, current, knobs.metric, value, reason, now)


def _recommend(knobs: PoolAutoscaling, metrics: PoolMetrics, value: float | None, current: int,
               state: PoolState, now: float) -> tuple[int, str]:
    bounded = _clamp(current, knobs)
    if bounded != current:
        return bounded, f"{current} replicas is outside [{knobs.min_replicas}, {knobs.max_replicas}]"
    held = _held_requests(metrics)
    if current == 0 and held > 0:
        raw = _raw_recommendation(knobs, value, current) if value is not None else 1
        desired = _clamp(max(1, min(raw, knobs.scale_up_max_step)), knobs)
        _remember(state, now, desired, knobs.scale_down_stabilization_seconds)
        return desired, f"{held:g} requests held at 0 replicas: scale from zero to {desired}"
    if value is None:
        return current, f"metric {knobs.metric} missing: keeping {current}"
    raw = _raw_recommendation(knobs, value, current)
    raw, slo_miss = _apply_slo(knobs, metrics, raw, current)
    raw = _clamp(raw, knobs)
    if raw == 0 and held > 0:
        raw = min(1, knobs.max_replicas)   # the last replica stays while the router holds requests for it
    _remember(state, now, raw, knobs.scale_down_stabilization_seconds)
    what = slo_miss or f"{knobs.metric}={value:g} (target {knobs.target_per_replica:g}/replica)"
    if raw > current:
        desired = min(raw, current + knobs.scale_up_max_step)
        capped = f", capped at +{knobs.scale_up_max_step}" if desired < raw else ""
        verdict = f"scale up to {desired}{capped}"
    elif raw < current:
        desired = max(r for _, r in state.recommendations)
        if desired >= current:
            return current, f"{what}: wants {raw}, held at {current} by the {knobs.scale_down_stabilization_seconds:g}s stabilization window"
        verdict = f"scale down to {desired}"
    else:
        return current, f"{what}: {current} is right"
    if _in_cooldown(knobs, state, now):
        return current, f"{what}: would {verdict}, in cooldown ({knobs.cooldown_seconds:g}s after the last change)"
    return desired, f"{what}: {verdict}"


def _raw_recommendation(knobs: PoolAutoscaling, value: float, current: int) -> int:
    if knobs.metric in AVERAGE_METRICS:
        ratio = value / knobs.target_per_replica
        if current > 0 and abs(ratio - 1.0) <= TOLERANCE:
            return current
        return math.ceil(max(current, 1) * ratio)
    wanted = value / knobs.target_per_replica
    if current > 0 and abs(wanted / current - 1.0) <= TOLERANCE:
        return current
    return math.ceil(wanted)


def _held_requests(metrics: PoolMetrics) -> float:
    """Requests the router holds for the pool: queued (also while the pool is empty) or in flight."""
    return max(metrics.queue_requests or 0.0, metrics.inflight_requests or 0.0)


def _apply_slo(knobs: PoolAutoscaling, metrics: PoolMetrics, raw: int, current: int) -> tuple[int, str | None]:
    checks = (("TTFT", knobs.ttft_slo_seconds, metrics.ttft_p90_seconds),
              ("TBT", knobs.tbt_slo_seconds, metrics.tbt_p90_seconds))
    for name, slo, p90 in checks:
        if slo is not None and p90 is not None and p90 > slo:
            return max(raw, current + 1), f"{name} P90 {p90:.3g}s above the {slo:g}s SLO"
    return raw, None


def _remember(state: PoolState, now: float, raw: int, window: float) -> None:
    """Keeps the window's recommendations that can still be its maximum: one followed by a larger or
    equal one never is (the later one leaves the window last), so the history holds at most one entry
    per replica count and its size in status stays bounded however often the pool is evaluated."""
    kept = [(t, r) for t, r in state.recommendations if now - t < window and r > raw] + [(now, raw)]
    state.recommendations = [(t, r) for i, (t, r) in enumerate(kept) if all(r > later for _, later in kept[i + 1:])]


def _in_cooldown(knobs: PoolAutoscaling, state: PoolState, now: float) -> bool:
    return state.last_change_time is not None and now - state.last_change_time < knobs.cooldown_seconds


def _clamp(n: int, knobs: PoolAutoscaling) -> int:
    return max(knobs.min_replicas, min(knobs.max_replicas, n))


def metric_field(name: str) -> str:
    """Spec metric name (camelCase) -> `PoolMetrics` field."""
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


def apply_ratio(prompt: Decision, token: Decision, bounds: PromptToTokenRatio,
                prompt_knobs: PoolAutoscaling, token_knobs: PoolAutoscaling) -> tuple[Decision, Decision]:
    """Raise the smaller side (never lower one: a raise cannot fail a request) into the ratio bounds."""
    p, t = prompt.desired, token.desired
    if bounds.min is not None and t > 0 and p / t < bounds.min:
        wanted = math.ceil(bounds.min * t - 1e-9)
        new_p = min(wanted, prompt_knobs.max_replicas)
        prompt = _raised(prompt, new_p, f"prompt:token {p}:{t} below {bounds.min:g}")
    if bounds.max is not None and t > 0 and p / t > bounds.max:
        wanted = math.ceil(p / bounds.max - 1e-9)
        new_t = min(wanted, token_knobs.max_replicas)
        token = _raised(token, new_t, f"prompt:token {p}:{t} above {bounds.max:g}")
    return prompt, token


def _raised(d: Decision, desired: int, why: str) -> Decision:
    if desired <= d.desired:
        return d
    return Decision(desired, d.current, d.metric, d.metric_value, f"{why}: raised to {desired} ({d.reason})", d.time)


class PoolScaler:
    """One pool's knobs and history, for callers that keep the state in memory (local mode)."""

    def __init__(self, knobs: PoolAutoscaling, state: PoolState | None = None):
        self.knobs = knobs
        self.state = state or PoolState()

    def evaluate(self, metrics: PoolMetrics, current: int, now: float) -> Decision:
        return decide(self.knobs, metrics, current, self.state, now)


class SplitScaler:
    """All pools of one SplitInference: per-pool decisions, then the prompt:token ratio bounds."""

    def __init__(self, knobs: Mapping[str, PoolAutoscaling], ratio: PromptToTokenRatio | None = None,
                 states: Mapping[str, PoolState] | None = None):
        states = states or {}
        self.pools = {name: PoolScaler(k, states.get(name)) for name, k in knobs.items()}
        self.ratio = ratio or PromptToTokenRatio()

    @classmethod
    def from_spec(cls, spec: SplitInferenceSpec) -> SplitScaler:
        """Every pool of a SplitInference, with its `autoscaling` knobs and the prompt:token bounds."""
        return cls({role: pool.autoscaling for role, pool in spec.pools.items()}, spec.autoscaling.prompt_to_token_ratio)

    def evaluate(self, metrics: Mapping[str, PoolMetrics], current: Mapping[str, int],
                 now: float) -> dict[str, Decision]:
        decisions = {name: s.evaluate(metrics.get(name, PoolMetrics()), current[name], now)
                     for name, s in self.pools.items() if name in current}
        if "prompt" in decisions and "token" in decisions:
            p, t = apply_ratio(decisions["prompt"], decisions["token"], self.ratio,
                               self.pools["prompt"].knobs, self.pools["token"].knobs)
            for name, d in (("prompt", p), ("token", t)):
                if d.desired != decisions[name].desired and d.changed:
                    self.pools[name].state.last_change_time = now
                decisions[name] = d
        return decisions

    def states(self) -> dict[str, dict]:
        return {name: s.state.to_dict() for name, s in self.pools.items()}


def deletion_costs(worker_hosts: Mapping[str, str], worker_load: Mapping[str, float]) -> dict[str, int]:
    """Removal order for a scale-down, as `controller.kubernetes.io/pod-deletion-cost` values: a
    worker's cost is the load the router reports for its address (KV blocks held), so the
    least-loaded go first. `worker_hosts` maps a worker (pod name) to its host or IP; the router's
    `worker_load` is keyed by "host:port". A worker the router does not report costs 0."""
    load_by_host: dict[str, float] = {}
    for addr, load in worker_load.items():
        host = addr.rsplit(":", 1)[0]
        load_by_host[host] = load_by_host.get(host, 0.0) + load
    return {worker: int(round(load_by_host.get(host, 0.0))) for worker, host in worker_hosts.items()}
