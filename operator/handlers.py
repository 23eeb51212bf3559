"""Every kopf handler of the operator, registered in one place (`register`): thin wrappers that
call phasesplit.operator.reconcile and phasesplit.operator.autoscaler (which owns pool replicas
once created, unless `spec.autoscaling.mode` is `none`).
"""

from __future__ import annotations

import logging

import kopf

from phasesplit.control import spec as si
from phasesplit.operator import autoscaler, builders, reconcile
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
    memo.kube = Kube.from_environment()
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
    if outcome.newly_invalid:
        # A spec that cannot work is reported once; retrying would not fix it.
        kopf.warn(body, reason="InvalidSpec", message=reconcile.status.ready_condition(outcome.status)["message"])


def reconcile_fn(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_) -> None:
    _report(reconcile.reconcile(memo.kube, dict(body)), body, logger)


def resync(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_) -> None:
    """Heals drift (a deleted or edited child) and notices a Secret or PVC that appeared later."""
    _report(reconcile.reconcile(memo.kube, dict(body)), body, logger)


def child_deployment_changed(namespace: str, labels: kopf.Labels, memo: kopf.Memo, **_) -> None:
    name = labels.get("app.kubernetes.io/instance")
    if name:
        reconcile.refresh_status(memo.kube, namespace, name)


async def autoscale(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_) -> None:
    await autoscaler.tick(memo.kube, body, memo, logger)


def register(registry: kopf.OperatorRegistry, tick_seconds: float = autoscaler.TICK_SECONDS) -> None:
    """Every handler, on `registry`; `tick_seconds` is the autoscaler timer's period."""
    resource = (si.API_GROUP, si.API_VERSION, si.PLURAL)
    kopf.on.startup(registry=registry)(configure)
    for cause in (kopf.on.resume, kopf.on.create, kopf.on.update):
        cause(*resource, registry=registry)(reconcile_fn)
    kopf.timer(*resource, interval=RESYNC_SECONDS, idle=RESYNC_SECONDS, registry=registry)(resync)
    kopf.on.event("apps", "v1", "deployments", labels=CHILD_LABELS, registry=registry)(child_deployment_changed)
    kopf.timer(*resource, interval=tick_seconds, registry=registry)(autoscale)
