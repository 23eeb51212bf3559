"""What the cluster must provide for a spec to work: the model's PVC, and the router's API-key Secret
(seen from the router pods' state: the operator may not read Secrets)."""

from __future__ import annotations

from phasesplit.control import spec as si
from phasesplit.operator import builders
from phasesplit.operator.builders import Owner
from phasesplit.operator.kube import Kube, path

SECRET_ERRORS = ("CreateContainerConfigError",)  # the kubelet's reason when an env Secret or key is missing


def cluster_problems(kube: Kube, owner: Owner, spec: si.SplitInferenceSpec) -> list[str]:
    problems = []
    if ref := spec.router.api_key_secret:
        problems += [f"router.apiKeySecret: {message}" for message in _router_config_errors(kube, owner, ref)]
    if pvc := spec.model.source.pvc:
        if kube.get(path("v1", "PersistentVolumeClaim", owner.namespace, pvc.claim_name)) is None:
            problems.append(f"model.source.pvc: PersistentVolumeClaim {pvc.claim_name!r} not found "
                            f"in namespace {owner.namespace!r}")
    return problems


def _router_config_errors(kube: Kube, owner: Owner, ref: si.SecretKeyRef) -> list[str]:
    selector = ",".join(f"{k}={v}" for k, v in builders.selector_labels(owner, "router").items())
    messages = set()
    for pod in kube.list("v1", "Pod", owner.namespace, selector):
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in SECRET_ERRORS:
                messages.add(f"Secret {ref.name!r} key {ref.key!r}: {waiting.get('message') or waiting['reason']}")
    return sorted(messages)
