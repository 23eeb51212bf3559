"""A SplitInference's children as the operator's process tests see them in the emulator."""

from phasesplit.control import spec as si
from phasesplit.operator import builders
from phasesplit.operator.kube import path

NS = "default"
SI = ("phasesplit.io/v1alpha1", "SplitInference")
KINDS = {"ConfigMap": "v1", "Service": "v1", "Deployment": "apps/v1", "NetworkPolicy": "networking.k8s.io/v1",
         "PodDisruptionBudget": "policy/v1"}


def si_path(name):
    return path(*SI, NS, name)


def get_si(kube, name):
    return kube.get(si_path(name))


def live_children(kube, name):
    out = {}
    for kind, version in KINDS.items():
        for obj in kube.list(version, kind, NS):
            if obj["metadata"].get("labels", {}).get("app.kubernetes.io/instance") == name:
                out[f"{kind}/{obj['metadata']['name']}"] = obj
    return out


def rendered(body):
    return builders.build_children(builders.Owner(body["metadata"]["name"], NS, body["metadata"]["uid"]),
                                   si.SplitInferenceSpec.model_validate(body["spec"]))
