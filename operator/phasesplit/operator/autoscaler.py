"""The builtin autoscaler: each tick of the operator's periodic loop (phasesplit.operator.handlers)
scales each pool of a SplitInference on its own queue.

The loop ticks every `TICK_SECONDS` (`PHASESPLIT_AUTOSCALE_TICK_SECONDS`) and `tick` skips a
resource until its `spec.autoscaling.intervalSeconds` has passed. `memo` is the resource's own
state between ticks (its scaler's history, its metrics source). Only `mode: builtin` is acted on; hpa/keda
objects are rendered by the reconciler. Decisions and metrics availability go to status through
the reconciler's status writer.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import time

import kopf

from phasesplit.control.router_metrics import MetricsUnavailable, RouterScrape, Snapshot
from phasesplit.control.scaling import Decision, PoolState, SplitScaler, deletion_costs
from phasesplit.control.spec import SplitInferenceSpec
from phasesplit.operator import reconcile
from phasesplit.operator.apply import SCALER_MANAGER
from phasesplit.operator.builders import CLUSTER_DOMAIN, Owner, pool_name, service_name
from phasesplit.operator.kube import Kube, path
from phasesplit.operator.metrics_source import PrometheusQuery, router_selector

TICK_SECONDS = float(os.environ.get("PHASESPLIT_AUTOSCALE_TICK_SECONDS", "5"))
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


async def tick(kube: Kube, body: dict, memo: dict, logger, cluster_domain: str = CLUSTER_DOMAIN) -> None:
    """One timer tick for one SplitInference: read its metrics, decide, scale, record."""
    phase = (body.get("status") or {}).get("phase")
    if phase in (None, "Failed"):  # not reconciled yet, or a spec that cannot work: nothing to scale
        return
    parsed = SplitInferenceSpec.model_validate(dict(body["spec"]))
    if parsed.autoscaling.mode != "builtin":
        return
    now = time.time()
    if now - memo.get("autoscale_last", 0.0) < parsed.autoscaling.interval_seconds:
        return
    memo["autoscale_last"] = now
    meta = body["metadata"]
    owner = Owner(meta["name"], meta["namespace"], meta.get("uid", ""), cluster_domain)
    saved = dict((body.get("status") or {}).get("autoscaling") or {})
    scaler = _scaler(memo, parsed, saved)
    try:
        snapshot = await _source(memo, parsed, owner).read()
    except MetricsUnavailable as e:
        logger.warning(f"metrics unavailable, keeping replicas: {e}")
        _metrics_event(body, memo, False, str(e))
        record = {**saved, "metrics": _unavailable(saved.get("metrics"), str(e))}
        await asyncio.to_thread(reconcile.refresh_status, kube, owner.namespace, owner.name, record,
                            owner.cluster_domain)
        return
    _metrics_event(body, memo, True, "router metrics read")
    decisions = await asyncio.to_thread(evaluate, kube, scaler, snapshot, owner, now, logger)
    record = {**_record(body, decisions, scaler),
              "metrics": {"available": True, "reason": "Scraped", "message": "router metrics read"}}
    await asyncio.to_thread(reconcile.refresh_status, kube, owner.namespace, owner.name, record,
                            owner.cluster_domain)


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
                   {"spec": {"replicas": decision.desired}}, field_manager=SCALER_MANAGER)
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
                   {"metadata": {"annotations": {DELETION_COST: str(cost)}}}, field_manager=SCALER_MANAGER)
    logger.debug(f"pod-deletion-cost set on {len(hosts)} pods of {deployment['metadata']['name']}")


def _matches(labels: dict | None, selector: dict) -> bool:
    return all((labels or {}).get(k) == v for k, v in selector.items())


def _scaler(memo: dict, parsed: SplitInferenceSpec, saved: dict) -> SplitScaler:
    """The resource's scaler, kept in its memo; rebuilt when the knobs change, keeping the history.
    After an operator restart the history comes back from status."""
    fresh = SplitScaler.from_spec(parsed)
    old: SplitScaler | None = memo.get("autoscaler")
    if old is not None:
        states = {pool: s.state for pool, s in old.pools.items()}
    else:
        states = {pool: PoolState.from_dict((saved.get(pool) or {}).get("state")) for pool in fresh.pools}
    for pool, s in fresh.pools.items():
        if pool in states:
            s.state = states[pool]
    memo["autoscaler"] = fresh
    return fresh


def _source(memo: dict, parsed: SplitInferenceSpec, owner: Owner):
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


def _record(body: dict, decisions: dict[str, Decision], scaler: SplitScaler) -> dict:
    """`status.autoscaling`: each pool's last decision and history; an Event for each change."""
    entries = {}
    for pool, d in decisions.items():
        entries[pool] = {**d.to_status(), "time": _rfc3339(d.time), "state": scaler.pools[pool].state.to_dict()}
        if d.changed:
            verb = "ScaledUp" if d.desired > d.current else "ScaledDown"
            kopf.event(body, type="Normal", reason=verb,
                       message=f"{pool} pool {d.current} -> {d.desired} replicas: {d.reason}")
    return entries


def _unavailable(previous: dict | None, message: str) -> dict:
    """The metrics record after a failed read. While reads keep failing it keeps the first failure's
    message (each one is logged): an error text that varies from one try to the next (a DNS error, a
    timeout) must not rewrite the status on every tick."""
    if previous and not previous.get("available"):
        return previous
    return {"available": False, "reason": "ScrapeFailed", "message": message}


def _metrics_event(body: dict, memo: dict, ok: bool, message: str) -> None:
    """An Event on each change of metrics availability (and when they are first found missing)."""
    if memo.get("metrics_ok", True) != ok:
        kopf.event(body, type="Normal" if ok else "Warning", reason="MetricsAvailable" if ok else "MetricsUnavailable",
                   message=message)
    memo["metrics_ok"] = ok


def _rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
