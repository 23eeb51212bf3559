"""Deletes the children a SplitInference owns that its spec no longer wants (a removed pool's
Deployment and Service, the HPA or ScaledObject left by a previous autoscaling mode, a pool's
previous engine ConfigMap).

A pool's previous ConfigMap stays until its Deployment has rolled out: old pods still run on it,
and one that restarts before the rollout ends must find it.

Children are found by their labels and confirmed by their owner reference, so nothing the
operator did not create for this SplitInference is touched.
"""

from __future__ import annotations

from phasesplit.operator.builders import MANAGED_BY, ROLE_LABEL, Owner
from phasesplit.operator.kube import Kube, KubeError, path
from phasesplit.operator.status import rollout

# Every kind the builders make, as (apiVersion, kind); Deployments first, the ConfigMaps they use after.
ROLLOUT_KINDS = [("apps/v1", "Deployment"), ("v1", "ConfigMap")]
KINDS = [*ROLLOUT_KINDS, ("v1", "Service"),
         ("networking.k8s.io/v1", "NetworkPolicy"), ("policy/v1", "PodDisruptionBudget"),
         ("autoscaling/v2", "HorizontalPodAutoscaler"), ("keda.sh/v1alpha1", "ScaledObject")]


def selector(owner: Owner) -> str:
    return f"app.kubernetes.io/instance={owner.name},app.kubernetes.io/managed-by={MANAGED_BY}"


def config_maps_used(deployment: dict) -> set[str]:
    pod = deployment["spec"]["template"]["spec"]
    return {source["configMapRef"]["name"] for c in pod.get("containers", []) for source in c.get("envFrom") or []
            if "configMapRef" in source}


def _old_pods_may_run(live: dict, desired: dict) -> bool:
    """A rollout under way, or a new template (another ConfigMap) not yet applied."""
    state = rollout(live)
    return bool(state and state[2]) or config_maps_used(live) != config_maps_used(desired)


def prune(kube: Kube, owner: Owner, desired: list[dict], kinds: list[tuple[str, str]] = KINDS) -> list[str]:
    """Deletes what `owner` owns beyond `desired`; returns "Kind/name" of each deleted object."""
    keep = {(child["kind"], child["metadata"]["name"]): child for child in desired}
    rolling: set[str] = set()   # roles whose Deployment still runs, or is yet to be given, an older template
    deleted = []
    for api_version, kind in kinds:
        try:
            items = kube.list(api_version, kind, owner.namespace, selector(owner))
        except KubeError as e:
            if e.status == 404:  # the kind is not installed (KEDA's CRD): nothing of it to prune
                continue
            raise
        for obj in items:
            meta = obj["metadata"]
            owned = any(ref.get("uid") == owner.uid for ref in meta.get("ownerReferences") or [])
            role = (meta.get("labels") or {}).get(ROLE_LABEL)
            wanted = (kind, meta["name"]) in keep
            if kind == "Deployment" and wanted and _old_pods_may_run(obj, keep[kind, meta["name"]]):
                rolling.add(role)
            if owned and not wanted and not (kind == "ConfigMap" and role in rolling):
                kube.delete(path(api_version, kind, owner.namespace, meta["name"]))
                deleted.append(f"{kind}/{meta['name']}")
    return deleted
