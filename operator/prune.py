"""Deletes the children a SplitInference owns that its spec no longer wants (a removed pool's
Deployment and Service, the HPA or ScaledObject left by a previous autoscaling mode).

Children are found by their labels and confirmed by their owner reference, so nothing the
operator did not create for this SplitInference is touched.
"""

from __future__ import annotations

from phasesplit.operator.builders import MANAGED_BY, Owner
from phasesplit.operator.kube import Kube, KubeError, path

# Every kind the builders make, as (apiVersion, kind).
KINDS = [("v1", "ConfigMap"), ("v1", "Service"), ("apps/v1", "Deployment"),
         ("networking.k8s.io/v1", "NetworkPolicy"), ("policy/v1", "PodDisruptionBudget"),
         ("autoscaling/v2", "HorizontalPodAutoscaler"), ("keda.sh/v1alpha1", "ScaledObject")]


def selector(owner: Owner) -> str:
    return f"app.kubernetes.io/instance={owner.name},app.kubernetes.io/managed-by={MANAGED_BY}"


def prune(kube: Kube, owner: Owner, desired: list[dict]) -> list[str]:
    """Deletes what `owner` owns beyond `desired`; returns "Kind/name" of each deleted object."""
    keep = {(child["kind"], child["metadata"]["name"]) for child in desired}
    deleted = []
    for api_version, kind in KINDS:
        try:
            items = kube.list(api_version, kind, owner.namespace, selector(owner))
        except KubeError as e:
            if e.status == 404:  # the kind is not installed (KEDA's CRD): nothing of it to prune
                continue
            raise
        for obj in items:
            name = obj["metadata"]["name"]
            owned = any(ref.get("uid") == owner.uid for ref in obj["metadata"].get("ownerReferences") or [])
            if owned and (kind, name) not in keep:
                kube.delete(path(api_version, kind, owner.namespace, name))
                deleted.append(f"{kind}/{name}")
    return deleted
