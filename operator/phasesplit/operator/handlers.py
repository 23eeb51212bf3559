"""Every kopf handler of the operator, registered in one place (`register`): thin wrappers that
call phasesplit.operator.reconcile and phasesplit.operator.autoscaler (which owns pool replicas
once created, unless `spec.autoscaling.mode` is `none`).

No handler needs a finalizer: the children go with their owner through the garbage collector, and
the periodic work (the autoscaler's ticks, the resync that heals drift) runs in one operator-wide
loop over the SplitInferences the watch has seen, not in kopf timers (which would put a finalizer
on every SplitInference, so that deleting one hangs once the operator is uninstalled).
"""

from __future__ import annotations

import asyncio
import logging
import time

import kopf

from phasesplit.control import spec as si
from phasesplit.operator import autoscaler, builders, errors, reconcile
from phasesplit.operator.kube import Kube, KubeError

RESYNC_SECONDS = 60.0
WATCHED_NAMESPACES: list[str] = []  # set by phasesplit.operator.main; empty: cluster-wide
CHILD_LABELS = {"app.kubernetes.io/managed-by": builders.MANAGED_BY}


def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=si.API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=si.API_GROUP)
    settings.posting.level = logging.WARNING  # Events for problems, not for every handler run
    settings.execution.max_workers = 8
    settings.persistence.finalizer = f"{si.API_GROUP}/finalizer"
    # The API server sends only the operator's own Deployments (a handler's `labels=` filters client-side).
    settings.watching.label_selectors["apps", "deployments"] = ",".join(f"{k}={v}" for k, v in CHILD_LABELS.items())
    memo.kube = Kube.from_environment()
    memo.setdefault("cluster_domain", builders.CLUSTER_DOMAIN)  # `phasesplit operator --cluster-domain`
    memo.seen = {}  # (namespace, name) -> the latest body the watch delivered
    if not settings.peering.standalone:
        for namespace in WATCHED_NAMESPACES or [None]:
            ensure_peering(memo.kube, settings.peering.name, namespace)


def ensure_peering(kube: Kube, name: str, namespace: str | None) -> None:
    """kopf pauses replicas only through an existing peering object: create it once."""
    obj = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering" if namespace else "ClusterKopfPeering",
           "metadata": {"name": name, **({"namespace": namespace} if namespace else {})}}
    try:
        kube.create(obj)
    except KubeError as e:
        if e.status != 409:
            raise


def _report(outcome: reconcile.Outcome, body: kopf.Body, logger: logging.Logger) -> None:
    changed = {k: v for k, v in outcome.applied.items() if v != "unchanged"}
    if changed:
        logger.info(f"applied {changed}")
    if outcome.pruned:
        logger.info(f"deleted children no longer wanted: {outcome.pruned}")
    if outcome.newly_invalid:
        # A spec that cannot work is reported once; retrying would not fix it.
        kopf.warn(body, reason="InvalidSpec", message=reconcile.status.ready_condition(outcome.status)["message"])
    if outcome.newly_failed:
        kopf.warn(body, reason="ApplyFailed", message="; ".join(outcome.failures))


def reconcile_fn(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, retry: int, **_) -> None:
    """One pass; a failure is raised as kopf's own error (phasesplit.operator.errors) once the status
    and Events say why, so that kopf retries what can heal, with backoff, and stops on what cannot."""
    try:
        outcome = reconcile.reconcile(memo.kube, dict(body), memo.cluster_domain)
    except errors.API_ERRORS as e:
        raise errors.from_exception(e, retry) from e
    _report(outcome, body, logger)
    if outcome.failures:
        raise errors.from_failures(outcome.failures, outcome.statuses, retry)


async def track(body: kopf.Body, type: str | None, memo: kopf.Memo, logger: logging.Logger, **_) -> None:
    """Keeps `memo.seen` to what the watch says exists (the periodic loop's work list); starts the
    loop on the first one, from a handler so that it inherits kopf's means to post Events."""
    if memo.loop.get("task") is None:  # memo.loop is shared: each resource's memo is a shallow copy
        memo.loop["task"] = asyncio.create_task(periodic(memo, memo.loop["tick_seconds"], logger))
    key = (body["metadata"].get("namespace"), body["metadata"]["name"])
    if type == "DELETED" or body["metadata"].get("deletionTimestamp"):
        memo.seen.pop(key, None)
    else:
        memo.seen[key] = dict(body)


def child_deployment_changed(namespace: str, labels: kopf.Labels, memo: kopf.Memo, **_) -> None:
    name = labels.get("app.kubernetes.io/instance")
    if name:
        reconcile.refresh_status(memo.kube, namespace, name, cluster_domain=memo.cluster_domain)


async def periodic(memo: kopf.Memo, tick_seconds: float, logger: logging.Logger) -> None:
    """Every tick: the builtin autoscaler for each SplitInference; every RESYNC_SECONDS: a reconcile
    that heals drift (a deleted or edited child, a deleted worker-token Secret, a Secret or PVC that
    appeared later)."""
    states: dict[str, dict] = {}  # per SplitInference uid: the autoscaler's memory, the last resync
    while True:
        await asyncio.sleep(tick_seconds)
        for key, body in list(memo.seen.items()):
            state = states.setdefault(body["metadata"].get("uid", ""), {"resynced": time.monotonic()})
            try:
                await autoscaler.tick(memo.kube, body, state, logger, memo.cluster_domain)
                if time.monotonic() - state["resynced"] >= RESYNC_SECONDS:
                    state["resynced"] = time.monotonic()
                    outcome = await asyncio.to_thread(reconcile.reconcile, memo.kube, body, memo.cluster_domain,
                                                        recheck_token=True)
                    _report(outcome, body, logger)
            except Exception as e:  # one SplitInference's failure must not stop the others'
                logger.warning(f"periodic work on {key[0]}/{key[1]} failed: {e}")
        live = {b["metadata"].get("uid", "") for b in memo.seen.values()}
        for uid in set(states) - live:
            del states[uid]


def register(registry: kopf.OperatorRegistry, tick_seconds: float = autoscaler.TICK_SECONDS) -> None:
    """Every handler, on `registry`; `tick_seconds` is the period of the autoscaler's loop."""
    resource = (si.API_GROUP, si.API_VERSION, si.PLURAL)
    kopf.on.startup(registry=registry)(configure)

    @kopf.on.startup(registry=registry)
    def loop_settings(memo: kopf.Memo, **_) -> None:
        memo.loop = {"tick_seconds": tick_seconds}

    for cause in (kopf.on.resume, kopf.on.create, kopf.on.update):
        cause(*resource, registry=registry)(reconcile_fn)
    kopf.on.event(*resource, registry=registry)(track)
    kopf.on.event("apps", "v1", "deployments", labels=CHILD_LABELS, registry=registry)(child_deployment_changed)

    @kopf.on.cleanup(registry=registry)
    async def stop_periodic(memo: kopf.Memo, **_) -> None:
        if memo.loop.get("task") is not None:
            memo.loop["task"].cancel()
