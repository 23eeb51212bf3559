"""The builtin autoscaler: a kopf timer per SplitInference that scales each pool on its own queue.

Loaded next to the other handlers: `kopf run -m phasesplit.operator.handlers -m phasesplit.operator.autoscaler`.
kopf fixes a timer's interval when the decorator runs, so the timer ticks every `TICK_SECONDS`
(`PHASESPLIT_AUTOSCALE_TICK_SECONDS`) and skips a resource until its `spec.autoscaling.intervalSeconds`
has passed. Only `mode: builtin` is acted on; hpa/keda objects are rendered by the other handlers.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import time

import kopf

from phasesplit.control.scaling import Decision, PoolState, SplitScaler, deletion_costs
from phasesplit.control.spec import SplitInferenceSpec

from phasesplit.operator.builders import Owner, pool_name, service_name
from phasesplit.operator.kube import Kube, KubeError, path
from phasesplit.control.router_metrics import MetricsUnavailable, RouterScrape, Snapshot
from phasesplit.operator.metrics_source import PrometheusQuery, router_selector

TICK_SECONDS = float(os.environ.get("PHASESPLIT_AUTOSCALE_TICK_SECONDS", "5"))
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
CONDITION = "MetricsAvailable"


def _kube(memo: kopf.Memo) -> Kube:
    """The operator's client (made at startup by phasesplit.operator.handlers), or one of our own."""
    global _own_kube
    if memo.get("kube") is not None:
        return memo["kube"]
    if _own_kube is None:
        _own_kube = Kube.from_environment()
    return _own_kube


_own_kube: Kube | None = None


@kopf.timer("phasesplit.io", "v1alpha1", "splitinferences", interval=TICK_SECONDS)
async def autoscale_timer(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta,
                          memo: kopf.Memo, patch: kopf.Patch, logger, **_):
    parsed = SplitInferenceSpec.model_validate(dict(spec))
    if parsed.autoscaling.mode != "builtin":
        return
    now = time.time()
    if now - memo.get("autoscale_last", 0.0) < parsed.autoscaling.interval_seconds:
        return
    memo["autoscale_last"] = now
    scaler = _scaler(memo, parsed, status)
    owner = Owner(meta["name"], meta["namespace"], meta.get("uid", ""))
    try:
        snapshot = await _source(memo, parsed, owner).read()
    except MetricsUnavailable as e:
        logger.warning(f"metrics unavailable, keeping replicas: {e}")
        _set_condition(body, status, patch, memo, False, "ScrapeFailed", str(e), meta)
        return
    _set_condition(body, status, patch, memo, True, "Scraped", "router metrics read", meta)
    try:
        decisions = await asyncio.to_thread(evaluate, _kube(memo), scaler, snapshot, owner, now, logger)
    except KubeError as e:
        raise kopf.TemporaryError(f"scaling {owner.namespace}/{owner.name}: {e}", delay=10) from e
    _record(body, patch, decisions, scaler)


def evaluate(kube: Kube, scaler: SplitScaler, snapshot: Snapshot, owner: Owner, now: float,
             logger) -> dict[str, Decision]:
    """Apply the policy to each pool whose Deployment exists, and scale those that must change."""
    deployments = {pool: d for pool in scaler.pools
                   if (d := kube.get(path("apps/v1", "Deployment", owner.namespace, pool_name(owner, pool))))}
    current = {pool: int(d.get("spec", {}).get("replicas", 1)) for pool, d in deployments.items()}
    decisions = scaler.evaluate(snapshot.pools, current, now)
    for pool, decision in decisions.items():
        if not decision.changed:
            continue
        deployment = deployments[pool]
        if decision.desired < decision.current:
            _mark_removal_order(kube, deployment, snapshot.worker_load, logger)
        name = deployment["metadata"]["name"]
        kube.patch(path("apps/v1", "Deployment", owner.namespace, name, "scale"),
                   {"spec": {"replicas": decision.desired}})
        logger.info(f"{pool} pool: {decision.current} -> {decision.desired} replicas ({decision.reason})")
    return decisions


def _mark_removal_order(kube: Kube, deployment: dict, worker_load: dict[str, float], logger) -> None:
    """Annotate the pool's pods with their load before a scale-down, so the least-loaded go first."""
    namespace = deployment["metadata"]["namespace"]
    selector = deployment["spec"]["selector"].get("matchLabels") or {}
    label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
    pods = kube.request("GET", f"/api/v1/namespaces/{namespace}/pods",
                        query=[("labelSelector", label_selector)]).get("items", [])
    hosts = {p["metadata"]["name"]: p["status"]["podIP"] for p in pods
             if (p.get("status") or {}).get("podIP") and _matches(p["metadata"].get("labels"), selector)}
    for pod, cost in deletion_costs(hosts, worker_load).items():
        kube.patch(f"/api/v1/namespaces/{namespace}/pods/{pod}",
                   {"metadata": {"annotations": {DELETION_COST: str(cost)}}})
    logger.debug(f"pod-deletion-cost set on {len(hosts)} pods of {deployment['metadata']['name']}")


def _matches(labels: dict | None, selector: dict) -> bool:
    return all((labels or {}).get(k) == v for k, v in selector.items())


def _scaler(memo: kopf.Memo, parsed: SplitInferenceSpec, status: kopf.Status) -> SplitScaler:
    """The resource's scaler, kept in its memo; rebuilt when the knobs change, keeping the history.
    After an operator restart the history comes back from status."""
    fresh = SplitScaler.from_spec(parsed)
    old: SplitScaler | None = memo.get("autoscaler")
    if old is not None:
        states = {pool: s.state for pool, s in old.pools.items()}
    else:
        saved = (status.get("autoscaling") or {}) if status else {}
        states = {pool: PoolState.from_dict((saved.get(pool) or {}).get("state")) for pool in fresh.pools}
    for pool, s in fresh.pools.items():
        if pool in states:
            s.state = states[pool]
    memo["autoscaler"] = fresh
    return fresh


def _source(memo: kopf.Memo, parsed: SplitInferenceSpec, owner: Owner):
    url = parsed.autoscaling.prometheus.url
    if url:
        key, make = f"prometheus:{url}", lambda: PrometheusQuery(url, router_selector(owner.namespace, service_name(owner)))
    else:
        port = parsed.router.service.port
        target = f"http://{service_name(owner)}.{owner.namespace}.svc:{port}/metrics"
        key, make = f"router:{target}", lambda: RouterScrape(target)
    if memo.get("autoscale_source_key") != key:
        memo["autoscale_source_key"], memo["autoscale_source"] = key, make()
    return memo["autoscale_source"]


def _record(body: kopf.Body, patch: kopf.Patch, decisions: dict[str, Decision], scaler: SplitScaler) -> None:
    entries = {}
    for pool, d in decisions.items():
        entries[pool] = {**d.to_status(), "time": _rfc3339(d.time), "state": scaler.pools[pool].state.to_dict()}
        if d.changed:
            verb = "ScaledUp" if d.desired > d.current else "ScaledDown"
            kopf.event(body, type="Normal", reason=verb,
                       message=f"{pool} pool {d.current} -> {d.desired} replicas: {d.reason}")
    patch.status["autoscaling"] = entries


def _set_condition(body: kopf.Body, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo, ok: bool,
                   reason: str, message: str, meta: kopf.Meta) -> None:
    """Set `MetricsAvailable` in status.conditions (the list is written whole: a merge patch replaces lists);
    an Event on each change of availability (and when they are first found missing)."""
    if memo.get("metrics_ok", True) != ok:
        kopf.event(body, type="Normal" if ok else "Warning", reason="MetricsAvailable" if ok else "MetricsUnavailable",
                   message=message)
    memo["metrics_ok"] = ok
    conditions = list((status or {}).get("conditions") or [])
    old = next((c for c in conditions if c.get("type") == CONDITION), None)
    value = "True" if ok else "False"
    if old is not None and old.get("status") == value and old.get("reason") == reason:
        return
    changed_at = old["lastTransitionTime"] if old and old.get("status") == value else _rfc3339(time.time())
    new = {"type": CONDITION, "status": value, "reason": reason, "message": message[:1024],
           "lastTransitionTime": changed_at, "observedGeneration": meta.get("generation")}
    patch.status["conditions"] = [c for c in conditions if c.get("type") != CONDITION] + [new]


def _rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
