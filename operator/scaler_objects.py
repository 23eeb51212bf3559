"""Cluster-metrics scaling: an HPA or a KEDA ScaledObject per pool, on the router's queue metrics.

Pure builders `SplitInference dict -> object dict`, used when `spec.autoscaling.mode` is `hpa` or
`keda`. Both scale the pool's Deployment on the same gauge the builtin policy reads, with the same
knobs: min/max, target per replica, scale-up step, scale-down stabilization window.

The router, not the workers, serves these gauges (labelled by `pool`), so the HPA uses External
metrics: a Prometheus adapter must expose them (charts/phasesplit/AUTOSCALING.md has its rules).
Totals use `AverageValue` (desired = ceil(total / target)); kvUtilization is already a pool
average and uses `Value` (desired = ceil(current * value / target)), as the builtin policy does.
"""

from __future__ import annotations

from phasesplit.control.scaling import AVERAGE_METRICS, PoolKnobs

from phasesplit.operator import builders
from phasesplit.control.router_metrics import POOL_GAUGES
from phasesplit.operator.metrics_source import router_selector
MAX_HPA_WINDOW = 3600  # HPA validation: stabilizationWindowSeconds
MAX_HPA_PERIOD = 1800  # HPA validation: policies[].periodSeconds


def _owner(si: dict) -> builders.Owner:
    meta = si["metadata"]
    return builders.Owner(meta["name"], meta.get("namespace") or "default", meta.get("uid") or "")


def pool_deployment_name(si: dict, pool: str) -> str:
    return builders.pool_name(_owner(si), pool)


def _knobs(si: dict, pool: str) -> PoolKnobs:
    pools = si.get("spec", {}).get("pools") or {}
    if pool not in pools:
        raise ValueError(f"spec.pools.{pool}: no such pool; have {', '.join(sorted(pools)) or 'none'}")
    autoscaling = pools[pool].get("autoscaling")
    if not autoscaling:
        raise ValueError(f"spec.pools.{pool}.autoscaling: required when spec.autoscaling.mode is hpa or keda")
    return PoolKnobs.from_spec(autoscaling)


def _metadata(si: dict, pool: str) -> dict:
    return builders.metadata(_owner(si), pool_deployment_name(si, pool), pool)


def _scale_target(si: dict, pool: str) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "name": pool_deployment_name(si, pool)}


def _interval(si: dict) -> int:
    return int((si.get("spec", {}).get("autoscaling") or {}).get("intervalSeconds") or 15)


def _behavior(knobs: PoolKnobs, interval: int) -> dict:
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


def _target(knobs: PoolKnobs) -> dict:
    value = _quantity(knobs.target_per_replica)
    if knobs.metric in AVERAGE_METRICS:
        return {"type": "Value", "value": value}
    return {"type": "AverageValue", "averageValue": value}


def _quantity(x: float) -> str:
    """A Kubernetes quantity: integers as is, fractions in milli-units (0.8 -> 800m)."""
    if float(x).is_integer():
        return str(int(x))
    return f"{round(x * 1000)}m"


def build_hpa(si: dict, pool: str) -> dict:
    """An autoscaling/v2 HorizontalPodAutoscaler for one pool, on an External metric from the adapter."""
    knobs = _knobs(si, pool)
    selector = {"pool": pool, "service": builders.service_name(_owner(si))}
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(si, pool),
        "spec": {
            "scaleTargetRef": _scale_target(si, pool),
            "minReplicas": max(knobs.min_replicas, 1),
            "maxReplicas": knobs.max_replicas,
            "metrics": [{"type": "External", "external": {
                "metric": {"name": POOL_GAUGES[knobs.metric], "selector": {"matchLabels": selector}},
                "target": _target(knobs)}}],
            "behavior": _behavior(knobs, _interval(si)),
        },
    }


def prometheus_url(si: dict) -> str | None:
    return ((si.get("spec", {}).get("autoscaling") or {}).get("prometheus") or {}).get("url")


def keda_query(si: dict, pool: str, metric: str) -> str:
    owner = _owner(si)
    selector = router_selector(owner.namespace, builders.service_name(owner)) + f',pool="{pool}"'
    agg = "avg" if metric in AVERAGE_METRICS else "sum"
    return f"{agg}({POOL_GAUGES[metric]}{{{selector}}})"


def build_scaled_object(si: dict, pool: str) -> dict:
    """A KEDA (keda.sh/v1alpha1) ScaledObject for one pool with a Prometheus trigger."""
    knobs = _knobs(si, pool)
    url = prometheus_url(si)
    if not url:
        raise ValueError("spec.autoscaling.prometheus.url: required when spec.autoscaling.mode is keda "
                         "(the Prometheus server KEDA queries)")
    name = pool_deployment_name(si, pool)
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _metadata(si, pool),
        "spec": {
            "scaleTargetRef": _scale_target(si, pool),
            "pollingInterval": _interval(si),
            "cooldownPeriod": max(int(knobs.cooldown_seconds), 1),
            "minReplicaCount": knobs.min_replicas,
            "maxReplicaCount": knobs.max_replicas,
            "advanced": {"horizontalPodAutoscalerConfig": {
                "name": f"{name}-keda", "behavior": _behavior(knobs, _interval(si))}},
            "triggers": [{
                "type": "prometheus",
                "name": f"{pool}-{knobs.metric}",
                "metricType": "Value" if knobs.metric in AVERAGE_METRICS else "AverageValue",
                "metadata": {"serverAddress": url, "query": keda_query(si, pool, knobs.metric),
                             "threshold": _decimal(knobs.target_per_replica)},
            }],
        },
    }


def _decimal(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))
