"""What the cluster must provide for a spec to work: the API-key Secret and the model's PVC."""

from __future__ import annotations

from phasesplit.control import spec as si
from phasesplit.operator.builders import Owner
from phasesplit.operator.kube import Kube, path


def cluster_problems(kube: Kube, owner: Owner, spec: si.SplitInferenceSpec) -> list[str]:
    problems = []
    if ref := spec.router.api_key_secret:
        secret = kube.get(path("v1", "Secret", owner.namespace, ref.name))
        if secret is None:
            problems.append(f"router.apiKeySecret: Secret {ref.name!r} not found in namespace {owner.namespace!r}")
        elif ref.key not in (secret.get("data") or {}) and ref.key not in (secret.get("stringData") or {}):
            problems.append(f"router.apiKeySecret: Secret {ref.name!r} has no key {ref.key!r}")
    if pvc := spec.model.source.pvc:
        if kube.get(path("v1", "PersistentVolumeClaim", owner.namespace, pvc.claim_name)) is None:
            problems.append(f"model.source.pvc: PersistentVolumeClaim {pvc.claim_name!r} not found "
                            f"in namespace {owner.namespace!r}")
    return problems
