"""One reconciliation pass against the emulator (RBAC, defaults, server-side apply), in process."""

import pytest
from support.examples import split_inference
from support.kube_emulator import OPERATOR_TOKEN, EmulatorThread
from support.operator_harness import kube_client

from phasesplit.control import spec as si
from phasesplit.operator import reconcile
from phasesplit.operator.kube import path

NS = "default"


@pytest.fixture(scope="module")
def server():
    with EmulatorThread() as emulator:
        yield emulator


@pytest.fixture
def admin(server):
    return kube_client(server.url)


@pytest.fixture
def operator(server):
    return kube_client(server.url, OPERATOR_TOKEN)


def create(admin, name: str, spec: dict) -> dict:
    return admin.create(split_inference(name, NS, spec=spec))


def si_path(name):
    return path(f"{si.API_GROUP}/{si.API_VERSION}", si.KIND, NS, name)


def deployment(admin, name):
    return admin.get(path("apps/v1", "Deployment", NS, name))


def writes(server) -> list[str]:
    return [f"{r.method} {r.url.path}" for r in server.emulator._requests if r.method in ("POST", "PATCH", "PUT", "DELETE")]


def test_switching_mode_none_to_builtin_keeps_the_pools_replicas(server, admin, operator):
    big = {"replicas": 8, "autoscaling": {"minReplicas": 1, "maxReplicas": 8}}
    create(admin, "switch", {"autoscaling": {"mode": "none"}, "pools": {"prompt": big}})
    reconcile.reconcile(operator, admin.get(si_path("switch")))
    assert deployment(admin, "switch-prompt")["spec"]["replicas"] == 8
    admin.patch(si_path("switch"), {"spec": {"autoscaling": {"mode": "builtin"}}})
    reconcile.reconcile(operator, admin.get(si_path("switch")))
    assert deployment(admin, "switch-prompt")["spec"]["replicas"] == 8, "letting go of replicas reset them"
    admin.patch(path("apps/v1", "Deployment", NS, "switch-prompt", "scale"), {"spec": {"replicas": 5}})
    reconcile.reconcile(operator, admin.get(si_path("switch")))
    assert deployment(admin, "switch-prompt")["spec"]["replicas"] == 5, "the operator overwrote autoscaled replicas"
    assert server.emulator.denied == []


def test_a_second_pass_writes_nothing(server, admin, operator):
    half = {"resources": {"requests": {"cpu": "0.5", "memory": "1024Mi"}}}
    create(admin, "quiet", {"pools": {"prompt": half, "token": half}})
    first = reconcile.reconcile(operator, admin.get(si_path("quiet")))
    assert set(first.applied.values()) == {"created"}
    assert deployment(admin, "quiet-prompt")["spec"]["template"]["spec"]["containers"][0]["resources"][
        "requests"]["cpu"] == "500m"  # the server rewrote it
    before = len(writes(server))
    second = reconcile.reconcile(operator, admin.get(si_path("quiet")))
    assert set(second.applied.values()) == {"unchanged"} and not second.status_written
    assert writes(server)[before:] == []


def test_children_no_longer_wanted_are_deleted(server, admin, operator):
    create(admin, "prune", {"autoscaling": {"mode": "hpa"}})
    reconcile.reconcile(operator, admin.get(si_path("prune")))
    hpa = path("autoscaling/v2", "HorizontalPodAutoscaler", NS, "prune-prompt")
    assert admin.get(hpa) is not None
    admin.patch(si_path("prune"), {"spec": {"autoscaling": {"mode": "builtin"}}})
    outcome = reconcile.reconcile(operator, admin.get(si_path("prune")))
    assert admin.get(hpa) is None, "the old HPA keeps scaling beside the builtin autoscaler"
    assert "HorizontalPodAutoscaler/prune-token" in outcome.pruned
    # A pool removed from the spec: its Deployment and Service go, the others stay.
    admin.patch(si_path("prune"), {"spec": {"pools": {"prompt": None, "token": None, "mixed": {"replicas": 1}}}})
    reconcile.reconcile(operator, admin.get(si_path("prune")))
    assert deployment(admin, "prune-prompt") is None and deployment(admin, "prune-token") is None
    assert admin.get(path("v1", "Service", NS, "prune-token")) is None
    assert deployment(admin, "prune-mixed") is not None and deployment(admin, "prune-router") is not None
    # Something with the same labels that this SplitInference does not own is left alone.
    stranger = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "prune-notes", "namespace": NS, "labels": {"app.kubernetes.io/instance": "prune",
                                                          "app.kubernetes.io/managed-by": "phasesplit-operator"}}}
    admin.create(stranger)
    reconcile.reconcile(operator, admin.get(si_path("prune")))
    assert admin.get(path("v1", "ConfigMap", NS, "prune-notes")) is not None
    assert server.emulator.denied == []


def test_a_refused_child_becomes_a_condition_and_the_others_are_applied(server, admin, operator):
    create(admin, "nokeda", {"autoscaling": {"mode": "keda", "prometheus": {"url": "http://prometheus:9090"}}})  # KEDA's CRD is not installed
    outcome = reconcile.reconcile(operator, admin.get(si_path("nokeda")))
    assert deployment(admin, "nokeda-prompt") is not None and deployment(admin, "nokeda-router") is not None
    assert [f.split(":")[0] for f in outcome.failures] == ["ScaledObject/nokeda-prompt", "ScaledObject/nokeda-token"]
    assert outcome.newly_failed
    conditions = {c["type"]: c for c in admin.get(si_path("nokeda"))["status"]["conditions"]}
    assert conditions["ChildrenApplied"]["status"] == "False"
    assert conditions["ChildrenApplied"]["reason"] == "ApplyFailed"
    assert "ScaledObject/nokeda-prompt" in conditions["ChildrenApplied"]["message"]
    assert conditions["Ready"]["reason"] == "ApplyFailed"
    again = reconcile.reconcile(operator, admin.get(si_path("nokeda")))
    assert again.failures and not again.newly_failed and not again.status_written  # reported once
    admin.patch(si_path("nokeda"), {"spec": {"autoscaling": {"mode": "builtin"}}})
    fixed = reconcile.reconcile(operator, admin.get(si_path("nokeda")))
    assert fixed.failures == []
    conditions = {c["type"]: c for c in admin.get(si_path("nokeda"))["status"]["conditions"]}
    assert conditions["ChildrenApplied"]["status"] == "True"


def rolled_out(admin, name, **extra):
    """What the Deployment controller reports once every replica runs the current template."""
    d = deployment(admin, name)
    n = d["spec"]["replicas"]
    status = {"observedGeneration": d["metadata"]["generation"], "replicas": n, "updatedReplicas": n,
              "readyReplicas": n, "availableReplicas": n, **extra}
    admin.patch(path("apps/v1", "Deployment", NS, name, "status"), {"status": status})


def conditions(admin, name):
    return {c["type"]: c for c in admin.get(si_path(name))["status"]["conditions"]}


def test_status_follows_a_rollout_until_the_new_pods_serve(server, admin, operator):
    create(admin, "roll", {"autoscaling": {"mode": "none"}})
    reconcile.reconcile(operator, admin.get(si_path("roll")))
    for component in ("router", "prompt", "token"):
        rolled_out(admin, f"roll-{component}")
    reconcile.refresh_status(operator, NS, "roll")
    assert conditions(admin, "roll")["Ready"]["status"] == "True"
    assert conditions(admin, "roll")["Progressing"]["reason"] == "RolloutComplete"
    assert admin.get(si_path("roll"))["status"]["images"] == {
        c: "phasesplit/worker:0.1.0" for c in ("router", "prompt", "token")}
    # A model change: the pods roll; the old ones serve until the new ones are ready.
    admin.patch(si_path("roll"), {"spec": {"model": {"name": "tiny-v2"}}})
    reconcile.refresh_status(operator, NS, "roll")  # a Deployment event before the reconcile
    assert admin.get(si_path("roll"))["status"]["observedGeneration"] == 1, "stamped before it was applied"
    reconcile.reconcile(operator, admin.get(si_path("roll")))
    body = admin.get(si_path("roll"))
    assert body["status"]["observedGeneration"] == body["metadata"]["generation"] == 2
    ready, progressing = conditions(admin, "roll")["Ready"], conditions(admin, "roll")["Progressing"]
    assert (ready["status"], ready["reason"]) == ("False", "RollingOut"), ready
    assert (progressing["status"], progressing["reason"]) == ("True", "RollingOut")
    stuck = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
             "message": 'ReplicaSet "roll-token-2" has timed out progressing.'}
    d = deployment(admin, "roll-token")
    admin.patch(path("apps/v1", "Deployment", NS, "roll-token", "status"), {"status": {
        "observedGeneration": d["metadata"]["generation"], "replicas": 2, "updatedReplicas": 1, "readyReplicas": 1,
        "conditions": [stuck]}})
    reconcile.refresh_status(operator, NS, "roll")
    progressing = conditions(admin, "roll")["Progressing"]
    assert (progressing["status"], progressing["reason"]) == ("False", "ProgressDeadlineExceeded")
    assert "token: " in progressing["message"] and "timed out" in progressing["message"]
    for component in ("router", "prompt", "token"):
        rolled_out(admin, f"roll-{component}", conditions=[])
    outcome = reconcile.refresh_status(operator, NS, "roll")
    assert outcome.status_written and conditions(admin, "roll")["Ready"]["status"] == "True"
    assert not reconcile.refresh_status(operator, NS, "roll").status_written  # written only on change


def test_a_custom_cluster_domain_reaches_the_router_and_the_status(server, admin, operator):
    create(admin, "corp", {})
    reconcile.reconcile(operator, admin.get(si_path("corp")), "corp.example")
    args = deployment(admin, "corp-router")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--prompt-workers") + 1] == "dns:corp-prompt.default.svc.corp.example:50051"
    assert args[args.index("--token-workers") + 1] == "dns:corp-token.default.svc.corp.example:50051"
    assert admin.get(si_path("corp"))["status"]["endpoint"] == "http://corp.default.svc.corp.example:8000"
    reconcile.refresh_status(operator, NS, "corp", cluster_domain="corp.example")  # a Deployment event
    assert admin.get(si_path("corp"))["status"]["endpoint"] == "http://corp.default.svc.corp.example:8000"


def test_a_pools_previous_config_map_stays_until_its_rollout_has_ended(server, admin, operator):
    def config_map(name):
        return deployment(admin, name)["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["name"]

    create(admin, "configs", {})
    reconcile.reconcile(operator, admin.get(si_path("configs")))
    rolled_out(admin, "configs-prompt")
    old = config_map("configs-prompt")
    admin.patch(si_path("configs"), {"spec": {"pools": {"prompt": {"engine": {"maxNumSeqs": 8}}}}})
    # A Deployment event between the spec change and its reconcile: the pool still runs `old`.
    assert reconcile.refresh_status(operator, NS, "configs").pruned == []
    outcome = reconcile.reconcile(operator, admin.get(si_path("configs")))
    assert config_map("configs-prompt") != old
    assert f"ConfigMap/{old}" not in outcome.pruned, "old prompt pods that restart mid-rollout need it"
    assert admin.get(path("v1", "ConfigMap", NS, old)) is not None
    assert reconcile.refresh_status(operator, NS, "configs").pruned == []
    rolled_out(admin, "configs-prompt")   # the Deployment event that ends the rollout
    assert reconcile.refresh_status(operator, NS, "configs").pruned == [f"ConfigMap/{old}"]
    assert admin.get(path("v1", "ConfigMap", NS, old)) is None
    assert server.emulator.denied == []


def test_the_worker_token_secret_is_made_once_and_never_rewritten(server, admin, operator):
    create(admin, "tokens", {})
    reconcile.reconcile(operator, admin.get(si_path("tokens")))
    secret_path = path("v1", "Secret", NS, "tokens-worker-token")
    token = admin.get(secret_path)
    assert token is not None and token["metadata"]["ownerReferences"][0]["name"] == "tokens"
    reconcile._TOKEN_REVISIONS.clear()  # as after an operator restart
    reconcile.reconcile(operator, admin.get(si_path("tokens")))
    assert admin.get(secret_path)["data"] == token["data"]
    for name in ("tokens-router", "tokens-token"):
        env = deployment(admin, name)["spec"]["template"]["spec"]["containers"][0]["env"]
        assert {"name": "PHASESPLIT_WORKER_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": "tokens-worker-token", "key": "token"}}} in env
    assert server.emulator.denied == []


def token_revisions(admin, name: str) -> set:
    """The worker-token revision on each pod template of `name`'s router and pools."""
    return {deployment(admin, f"{name}-{role}")["spec"]["template"]["metadata"]["annotations"].get(
        "phasesplit.io/worker-token-uid") for role in ("router", "prompt", "token")}


def test_a_deleted_worker_token_secret_is_made_anew_by_the_resync_and_rolls_every_pod(server, admin, operator):
    create(admin, "rotate", {})
    reconcile.reconcile(operator, admin.get(si_path("rotate")))
    secret_path = path("v1", "Secret", NS, "rotate-worker-token")
    first = admin.get(secret_path)
    assert token_revisions(admin, "rotate") == {first["metadata"]["uid"]}

    admin.delete(secret_path)
    reconcile.reconcile(operator, admin.get(si_path("rotate")), recheck_token=True)  # the periodic resync
    second = admin.get(secret_path)
    assert second is not None and second["data"] != first["data"]
    assert token_revisions(admin, "rotate") == {second["metadata"]["uid"]}, "the pods keep the old token"

    reconcile._TOKEN_REVISIONS.clear()  # an operator restarted since: the revision is read off the router
    before = len(writes(server))
    reconcile.reconcile(operator, admin.get(si_path("rotate")), recheck_token=True)
    assert admin.get(secret_path)["data"] == second["data"]
    assert token_revisions(admin, "rotate") == {second["metadata"]["uid"]}
    new_writes = writes(server)[before:]
    assert len(new_writes) == 1 and new_writes[0].endswith(f"POST /api/v1/namespaces/{NS}/secrets"), new_writes
    assert server.emulator.denied == []  # with `create` alone on Secrets
