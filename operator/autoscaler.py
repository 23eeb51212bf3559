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
import kubernetes

from phasesplit.autoscale import Decision, PoolState, SplitScaler, deletion_costs
from phasesplit.spec import SplitInferenceSpec

from .autoscaling_objects import pool_deployment_name
from .metrics_source import MetricsUnavailable, PrometheusQuery, RouterScrape, Snapshot, router_selector

TICK_SECONDS = float(os.environ.get("PHASESPLIT_AUTOSCALE_TICK_SECONDS", "5"))
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
CONDITION = "MetricsAvailable"


class Kube:
    """The two API groups the autoscaler writes to, made once per process from the ambient config."""
    _apis: tuple | None = None

    @classmethod
    def apis(cls) -> tuple[kubernetes.client.AppsV1Api, kubernetes.client.CoreV1Api]:
        if cls._apis is None:
            try:
                kubernetes.config.load_incluster_config()
            except kubernetes.config.ConfigException:
                kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
            client = kubernetes.client.ApiClient()
            cls._apis = (kubernetes.client.AppsV1Api(client), kubernetes.client.CoreV1Api(client))
        return cls._apis


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
    namespace, name = meta["namespace"], meta["name"]
    try:
        snapshot = await _source(memo, parsed, namespace, name).read()
    except MetricsUnavailable as e:
        logger.warning(f"metrics unavailable, keeping replicas: {e}")
        _set_condition(body, status, patch, False, "ScrapeFailed", str(e), meta)
        return
    _set_condition(body, status, patch, True, "Scraped", "router metrics read", meta)
    decisions = await evaluate(scaler, snapshot, namespace, name, now, logger)
    _record(body, patch, decisions, scaler)


async def evaluate(scaler: SplitScaler, snapshot: Snapshot, namespace: str, name: str, now: float,
                   logger) -> dict[str, Decision]:
    """Apply the policy to each pool whose Deployment exists, and scale those that must change."""
    apps, core = Kube.apis()
    current = {}
    deployments = {}
    for pool in scaler.pools:
        deployment = await _read_deployment(apps, namespace, pool_deployment_name({"metadata": {"name": name}}, pool))
        if deployment is not None:
            deployments[pool] = deployment
            current[pool] = deployment.spec.replicas if deployment.spec.replicas is not None else 1
    decisions = scaler.evaluate(snapshot.pools, current, now)
    for pool, decision in decisions.items():
        if not decision.changed:
            continue
        deployment = deployments[pool]
        if decision.desired < decision.current:
            await _mark_removal_order(core, namespace, deployment, snapshot.worker_load, logger)
        await asyncio.to_thread(apps.patch_namespaced_deployment_scale, deployment.metadata.name, namespace,
                                {"spec": {"replicas": decision.desired}})
        logger.info(f"{pool} pool: {decision.current} -> {decision.desired} replicas ({decision.reason})")
    return decisions


async def _read_deployment(apps, namespace: str, name: str):
    try:
        return await asyncio.to_thread(apps.read_namespaced_deployment, name, namespace)
    except kubernetes.client.ApiException as e:
        if e.status == 404:
            return None
        raise kopf.TemporaryError(f"reading Deployment {namespace}/{name}: {e.status} {e.reason}", delay=10)


async def _mark_removal_order(core, namespace: str, deployment, worker_load: dict[str, float], logger) -> None:
    """Annotate the pool's pods with their load before a scale-down, so the least-loaded go first."""
    selector = deployment.spec.selector.match_labels or {}
    label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
    pods = await asyncio.to_thread(core.list_namespaced_pod, namespace, label_selector=label_selector)
    hosts = {p.metadata.name: p.status.pod_ip for p in pods.items
             if p.status and p.status.pod_ip and _matches(p.metadata.labels, selector)}
    for pod, cost in deletion_costs(hosts, worker_load).items():
        body = {"metadata": {"annotations": {DELETION_COST: str(cost)}}}
        await asyncio.to_thread(core.patch_namespaced_pod, pod, namespace, body)
    logger.debug(f"pod-deletion-cost set on {len(hosts)} pods of {deployment.metadata.name}")


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


def _source(memo: kopf.Memo, parsed: SplitInferenceSpec, namespace: str, name: str):
    url = parsed.autoscaling.prometheus.url
    if url:
        key, make = f"prometheus:{url}", lambda: PrometheusQuery(url, router_selector(namespace, name))
    else:
        port = parsed.router.service.port
        target = f"http://{name}-router.{namespace}.svc:{port}/metrics"
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


def _set_condition(body: kopf.Body, status: kopf.Status, patch: kopf.Patch, ok: bool, reason: str,
                   message: str, meta: kopf.Meta) -> None:
    """Set `MetricsAvailable` in status.conditions (the list is written whole: a merge patch replaces lists)."""
    conditions = list((status or {}).get("conditions") or [])
    pending = patch.status.get("conditions")
    if pending is not None:
        conditions = list(pending)
    old = next((c for c in conditions if c.get("type") == CONDITION), None)
    value = "True" if ok else "False"
    if old is not None and old.get("status") == value and old.get("reason") == reason:
        return
    if old is None or old.get("status") != value:
        kopf.event(body, type="Normal" if ok else "Warning", reason="MetricsAvailable" if ok else "MetricsUnavailable",
                   message=message)
    changed_at = old["lastTransitionTime"] if old and old.get("status") == value else _rfc3339(time.time())
    new = {"type": CONDITION, "status": value, "reason": reason, "message": message[:1024],
           "lastTransitionTime": changed_at, "observedGeneration": meta.get("generation")}
    patch.status["conditions"] = [c for c in conditions if c.get("type") != CONDITION] + [new]


def _rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
