"""Cluster-metrics scaling: an HPA or a KEDA ScaledObject per pool, on the router's queue metrics.

Pure builders `(owner, spec, pool) -> object dict`, used when `spec.autoscaling.mode` is `hpa` or
`keda`. Both scale the pool's Deployment on the same gauge the builtin policy reads, with the same
knobs: min/max, target per replica, scale-up step, scale-down stabilization window.

The router, not the workers, serves these gauges (labelled by `pool`), so the HPA uses External
metrics: a Prometheus adapter must expose them (charts/phasesplit/AUTOSCALING.md has its rules).
Totals use `AverageValue` (desired = ceil(total / target)); kvUtilization is already a pool
average and uses `Value` (desired = ceil(current * value / target)), as the builtin policy does.
"""

from __future__ import annotations

from phasesplit.control import spec as si
from phasesplit.control.router_metrics import POOL_GAUGES
from phasesplit.control.scaling import AVERAGE_METRICS
from phasesplit.operator import builders
from phasesplit.operator.metrics_source import router_selector

MAX_HPA_WINDOW = 3600  # HPA validation: stabilizationWindowSeconds
MAX_HPA_PERIOD = 1800  # HPA validation: policies[].periodSeconds


def _scale_target(owner: builders.Owner, role: str) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "name": builders.pool_name(owner, role)}


def _behavior(knobs: si.PoolAutoscaling, interval: int) -> dict:
    if knobs.scale_down_stabilization_seconds > MAX_HPA_WINDOW:
        raise ValueError(f"autoscaling.scaleDownStabilizationSeconds: at most {MAX_HPA_WINDOW} with an HPA, "
                         f"got {knobs.scale_down_stabilization_seconds:g}")
    period = min(max(interval, int(knobs.cooldown_seconds), 1), MAX_HPA_PERIOD)
    return {
        "scaleUp": {"stabilizationWindowSeconds": 0, "selectPolicy": "Max",
                    "policies": [{"type": "Pods", "value": knobs.scale_up_max_step,
                                  "periodSeconds": period}]},
        "scaleDown": {"stabilizationWindowSeconds": int(knobs.scale_down_stabilization_seconds),
                      "selectPolicy": "Max",
                      "policies": [{"type": "Percent", "value": 100,
                                    "periodSeconds": period}]},
    }


def _target(knobs: si.PoolAutoscaling) -> dict:
    value = _quantity(knobs.target_per_replica)
    if knobs.metric in AVERAGE_METRICS:
        return {"type": "Value", "value": value}
    return {"type": "AverageValue", "averageValue": value}


def _quantity(x: float) -> str:
    """A Kubernetes quantity: integers as is, fractions in milli-units (0.8 -> 800m)."""
    if float(x).is_integer():
        return str(int(x))
    return f"{round(x * 1000)}m"


def build_hpa(owner: builders.Owner, spec: si.SplitInferenceSpec, role: str) -> dict:
    """An autoscaling/v2 HorizontalPodAutoscaler for one pool, on an External metric from the adapter."""
    knobs = getattr(spec.pools, role).autoscaling
    selector = {"pool": role, "service": builders.service_name(owner)}
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": builders.metadata(owner, builders.pool_name(owner, role), role),
        "spec": {
            "scaleTargetRef": _scale_target(owner, role),
            # 0 needs the HPAScaleToZero feature gate (alpha, off by default): never rendered
            "minReplicas": max(knobs.min_replicas, 1),
            "maxReplicas": knobs.max_replicas,
            "metrics": [{"type": "External", "external": {
                "metric": {"name": POOL_GAUGES[knobs.metric], "selector": {"matchLabels": selector}},
                "target": _target(knobs)}}],
            "behavior": _behavior(knobs, spec.autoscaling.interval_seconds),
        },
    }


def keda_query(owner: builders.Owner, role: str, metric: str) -> str:
    selector = router_selector(owner.namespace, builders.service_name(owner)) + f',pool="{role}"'
    agg = "avg" if metric in AVERAGE_METRICS else "sum"
    return f"{agg}({POOL_GAUGES[metric]}{{{selector}}})"


def build_scaled_object(owner: builders.Owner, spec: si.SplitInferenceSpec, role: str) -> dict:
    """A KEDA (keda.sh/v1alpha1) ScaledObject for one pool with a Prometheus trigger."""
    knobs = getattr(spec.pools, role).autoscaling
    url = spec.autoscaling.prometheus.url
    if not url:
        raise ValueError("spec.autoscaling.prometheus.url: required when spec.autoscaling.mode is keda "
                         "(the Prometheus server KEDA queries)")
    name = builders.pool_name(owner, role)
    interval = spec.autoscaling.interval_seconds
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": builders.metadata(owner, name, role),
        "spec": {
            "scaleTargetRef": _scale_target(owner, role),
            "pollingInterval": interval,
            "cooldownPeriod": max(int(knobs.cooldown_seconds), 1),
            "minReplicaCount": knobs.min_replicas,
            "maxReplicaCount": knobs.max_replicas,
            "advanced": {"horizontalPodAutoscalerConfig": {
                "name": f"{name}-keda", "behavior": _behavior(knobs, interval)}},
            "triggers": [{
                "type": "prometheus",
                "name": f"{role}-{knobs.metric}",
                "metricType": "Value" if knobs.metric in AVERAGE_METRICS else "AverageValue",
                "metadata": {"serverAddress": url, "query": keda_query(owner, role, knobs.metric),
                             "threshold": _decimal(knobs.target_per_replica)},
            }] + ([_held_trigger(owner, role, url)] if knobs.min_replicas == 0 else []),
        },
    }


def _held_trigger(owner: builders.Owner, role: str, url: str) -> dict:
    """Scale from zero: KEDA activates the pool (0 -> 1) while the router holds any request for it
    (queued for the empty pool, or in flight) and lets it go to 0 only when none is held. Clamped to 1
    against a threshold of 1 as a `Value` metric, it never asks for more replicas than the pool has."""
    return {"type": "prometheus", "name": f"{role}-held", "metricType": "Value",
            "metadata": {"serverAddress": url, "threshold": "1", "activationThreshold": "0",
                         "query": f"clamp_max({keda_query(owner, role, 'inflightRequests')}, 1)"}}


def build_scaling_objects(owner: builders.Owner, spec: si.SplitInferenceSpec) -> list[dict]:
    """HPA or KEDA objects for the worker pools when the cluster's metrics pipeline scales them."""
    mode = spec.autoscaling.mode
    if mode not in ("hpa", "keda"):
        return []
    build = build_hpa if mode == "hpa" else build_scaled_object
    return [build(owner, spec, role) for role, _ in spec.pools.items()]


def _decimal(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))
