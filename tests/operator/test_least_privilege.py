"""What the chart lets the operator do: by default only in the namespaces it watches (cluster-wide it
may list and watch CRDs, as kopf needs), and on pods only their pod-deletion-cost (the
ValidatingAdmissionPolicy, its CEL run here with cel-python); the operator works with no more."""

import copy
import subprocess

import kmock
import pytest
from support.admission import OPERATOR_USER, Policy, chart_policies
from support.examples import split_inference
from support.kube_emulator import OPERATOR_TOKEN, Emulator, EmulatorThread
from support.operator_harness import in_process_operator, kube_client, server_metadata
from support.polling import eventually
from support.rbac import CHART, NAMESPACE, chart_authorizer, render_chart

from phasesplit.control import spec as si
from phasesplit.operator import builders, crd
from phasesplit.operator.autoscaler import DELETION_COST
from phasesplit.operator.kube import KubeError
from support.crd_validator import validate

pytestmark = pytest.mark.kmock(cls=Emulator)

KOPF_DISCOVERY = [{"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
                   "verbs": ["list", "watch"]}]
WORKLOAD_NS = "models"
SI = "phasesplit.io/v1alpha1/splitinferences"


def operator_args(docs: list[dict]) -> list[str]:
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"]


def test_the_default_install_grants_nothing_cluster_wide_but_what_kopf_needs():
    authorizer = chart_authorizer()
    assert [g.rule for g in authorizer.grants if g.namespace is None] == KOPF_DISCOVERY
    assert {g.namespace for g in authorizer.grants} == {None, NAMESPACE}
    assert not authorizer.allows("create", "apps", "deployments", "kube-system")
    assert authorizer.allows("create", "apps", "deployments", NAMESPACE)
    args = operator_args(render_chart())
    assert f"--namespace={NAMESPACE}" in args and "--all-namespaces" not in args


def test_watched_namespaces_get_a_role_each_and_the_operator_watches_them():
    docs = render_chart("operator.watchNamespaces={models,staging}")
    roles = {(d["kind"], d["metadata"]["namespace"]) for d in docs if d["kind"] in ("Role", "RoleBinding")}
    assert roles == {(kind, ns) for kind in ("Role", "RoleBinding") for ns in ("models", "staging")}
    assert [a for a in operator_args(docs) if a.startswith("--namespace")] == ["--namespace=models",
                                                                                "--namespace=staging"]
    authorizer = chart_authorizer("operator.watchNamespaces={models,staging}")
    assert authorizer.allows("patch", "phasesplit.io", "splitinferences/status", "staging")
    assert not authorizer.allows("patch", "phasesplit.io", "splitinferences/status", NAMESPACE)


def test_cluster_wide_is_asked_for_and_excludes_a_namespace_list(helm):
    docs = render_chart("rbac.clusterWide=true")
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]
    assert "--all-namespaces" in operator_args(docs)
    assert chart_authorizer("rbac.clusterWide=true").allows("create", "apps", "deployments", "anywhere")
    both = subprocess.run([helm, "template", "x", str(CHART), "--set", "rbac.clusterWide=true",
                           "--set", "operator.watchNamespaces={models}"], capture_output=True, text=True)
    assert both.returncode != 0 and "operator.watchNamespaces" in both.stderr


def test_images_are_referable_by_digest():
    digest = "sha256:" + "a" * 64
    deployment = next(d for d in render_chart(f"operator.image.digest={digest}") if d["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == f"phasesplit/operator@{digest}"


# ---- the operator with the default install's RBAC ----

@pytest.fixture
def namespaced_cluster(kmock):
    kmock.authorizer = chart_authorizer(f"operator.watchNamespaces={{{WORKLOAD_NS}}}")
    for ns, name in ((WORKLOAD_NS, "tiny"), ("elsewhere", "other")):
        body = split_inference(name, ns, spec={"autoscaling": {"mode": "none"}})
        body["metadata"] = server_metadata(name, ns)
        kmock.objects[SI, ns, name] = body
    return kmock


async def test_the_operator_works_in_its_namespaces_with_the_namespaced_rbac(namespaced_cluster, tmp_path,
                                                                             monkeypatch):
    cluster = namespaced_cluster
    operator = in_process_operator(cluster, tmp_path, monkeypatch, namespaces=(WORKLOAD_NS,))

    def ready():
        status = cluster.objects[SI, WORKLOAD_NS, "tiny"].raw.get("status") or {}
        return any(c["type"] == "ChildrenApplied" and c["status"] == "True" for c in status.get("conditions", []))

    async with operator():
        await eventually(ready, timeout=30, what="the SplitInference's children applied")
    deployments = {key[2] for key, obj in cluster.objects.items()
                   if key[0] == kmock.resource("apps/v1/deployments") and not obj.deleted}
    assert deployments == {"tiny-router", "tiny-prompt", "tiny-token"}  # none for the unwatched namespace
    assert cluster.denied == []


# ---- the ValidatingAdmissionPolicy on the operator's pod patches ----

def admission_policy() -> Policy:
    (policy,) = chart_policies()
    return policy


POD = {"metadata": {"name": "tiny-prompt-0", "namespace": "default",
                    "labels": {"app.kubernetes.io/managed-by": "phasesplit-operator", "phasesplit.io/role": "prompt"},
                    "annotations": {"kubectl.kubernetes.io/restartedAt": "now"},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "u"}]},
       "spec": {"containers": [{"name": "worker", "image": "phasesplit/worker:0.1.0"}]}}


def changed(edit) -> dict:
    pod = copy.deepcopy(POD)
    edit(pod)
    return pod


def test_the_operator_may_set_only_the_deletion_cost_of_its_own_pods():
    policy = admission_policy()
    cost = changed(lambda p: p["metadata"]["annotations"].update({DELETION_COST: "-5"}))
    assert policy.refusals(POD, cost, OPERATOR_USER) == []
    again = changed(lambda p: p["metadata"]["annotations"].update({DELETION_COST: "3"}))
    assert policy.refusals(cost, again, OPERATOR_USER) == []
    refused = {
        "a label": changed(lambda p: p["metadata"]["labels"].update({"phasesplit.io/role": "token"})),
        "the image": changed(lambda p: p["spec"]["containers"][0].update({"image": "evil/image"})),
        "another annotation": changed(lambda p: p["metadata"]["annotations"].update({"x": "y"})),
        "an annotation removed": changed(lambda p: p["metadata"].pop("annotations")),
        "the owners": changed(lambda p: p["metadata"].pop("ownerReferences")),
    }
    for what, pod in refused.items():
        assert policy.refusals(POD, pod, OPERATOR_USER), what
    foreign = changed(lambda p: p["metadata"]["labels"].pop("app.kubernetes.io/managed-by"))
    assert policy.refusals(foreign, {**foreign, "metadata": {**foreign["metadata"], "annotations": {
        **foreign["metadata"]["annotations"], DELETION_COST: "1"}}}, OPERATOR_USER)
    assert policy.refusals(POD, refused["a label"], "system:serviceaccount:ml:someone-else") == []


def test_the_policy_binds_to_the_operators_service_account_and_can_be_left_out():
    policy = admission_policy()
    assert OPERATOR_USER in policy.spec["matchConditions"][0]["expression"]
    binding = next(d for d in render_chart() if d["kind"] == "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": policy.name, "validationActions": ["Deny"]}
    assert not [d for d in render_chart("admissionPolicy.enabled=false") if "AdmissionPolicy" in d["kind"]]


def test_the_spec_takes_images_by_digest():
    digest = "sha256:" + "b" * 64
    doc = split_inference(spec={"images": {"worker": f"registry.example/phasesplit/worker@{digest}",
                                           "router": f"registry.example/phasesplit/worker@{digest}"}})
    assert validate(crd.build_crd(), doc) == []
    spec = si.SplitInference.model_validate(doc).spec
    image = f"registry.example/phasesplit/worker@{digest}"
    assert builders.worker_image(spec, spec.pools.token) == builders.router_image(spec) == image


def test_the_emulator_holds_the_operators_pod_patches_to_the_policy():
    with EmulatorThread() as server:
        admin, operator = kube_client(server.url), kube_client(server.url, OPERATOR_TOKEN)
        pod_without_owner = changed(lambda p: p["metadata"].pop("ownerReferences"))  # the collector would delete it
        admin.create({"apiVersion": "v1", "kind": "Pod", **pod_without_owner})
        pod = "/api/v1/namespaces/default/pods/tiny-prompt-0"
        operator.patch(pod, {"metadata": {"annotations": {DELETION_COST: "7"}}})
        assert admin.get(pod)["metadata"]["annotations"][DELETION_COST] == "7"
        with pytest.raises(KubeError) as refused:
            operator.patch(pod, {"metadata": {"labels": {"phasesplit.io/role": "token"}}})
        assert refused.value.status == 422 and "pod-patches" in server.emulator.denied[-1]
        assert admin.get(pod)["metadata"]["labels"]["phasesplit.io/role"] == "prompt"
