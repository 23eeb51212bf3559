"""`phasesplit operator` as a real process (kopf) against the kmock Kubernetes emulator.

One operator and one emulator for the module; the tests run in order, as a user's session would.
"""

import copy

import pytest
from support.examples import load_example

from phasesplit.operator import builders
from phasesplit.operator.apply import matches
from phasesplit.operator.kube import path
from support.kube_emulator import EmulatorThread
from support.operator_harness import kube_client, start_operator, stop_operator
from support.operator_children import NS, get_si, live_children, rendered, si_path
from support.polling import wait_for

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("operator")
    with EmulatorThread() as emulator:
        kubeconfig = emulator.kubeconfig(tmp / "kubeconfig")
        state = {"emulator": emulator, "kube": kube_client(emulator.url), "kubeconfig": kubeconfig,
                 "log": tmp / "operator.log"}
        state["proc"] = start_operator(kubeconfig, state["log"])
        yield state
        if state["proc"].poll() is None:
            stop_operator(state["proc"])


def ready_condition(body):
    return next((c for c in (body.get("status") or {}).get("conditions", []) if c["type"] == "Ready"), None)


def test_apply_creates_every_child_with_owner_and_rendered_spec(cluster):
    kube = cluster["kube"]
    doc = load_example("tiny-cpu")
    doc["metadata"]["namespace"] = NS
    kube.create(doc)
    body = get_si(kube, "tiny")
    want = rendered(body)
    children = wait_for(lambda: (c := live_children(kube, "tiny")) and len(c) == len(want) and c,
                        timeout=60, what="all children")  # the first pass waits for kopf to start
    for obj in want:
        live = children[f"{obj['kind']}/{obj['metadata']['name']}"]
        assert live["metadata"]["ownerReferences"] == [builders.Owner("tiny", NS, body["metadata"]["uid"]).reference()]
        assert matches(obj, live), obj["metadata"]["name"]


def test_status_follows_the_deployments(cluster):
    kube = cluster["kube"]
    status = wait_for(lambda: (get_si(kube, "tiny").get("status") or {}).get("pools"), what="status")
    assert status["prompt"]["ready"] == "0/1"
    body = get_si(kube, "tiny")
    assert ready_condition(body)["status"] == "False" and body["status"]["phase"] == "Pending"
    for name in ("tiny-router", "tiny-prompt", "tiny-token"):  # what the Deployment controller would report
        generation = kube.get(path("apps/v1", "Deployment", NS, name))["metadata"]["generation"]
        kube.patch(path("apps/v1", "Deployment", NS, name, "status"), {"status": {
            "observedGeneration": generation, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1,
            "availableReplicas": 1}})
    body = wait_for(lambda: (b := get_si(kube, "tiny")) and ready_condition(b)["status"] == "True" and b,
                    what="Ready=True")
    assert body["status"]["phase"] == "Running"
    assert body["status"]["pools"]["token"] == {"replicas": 1, "updatedReplicas": 1, "readyReplicas": 1, "ready": "1/1"}
    assert body["status"]["endpoint"] == "http://tiny.default.svc.cluster.local:8000"
    assert body["status"]["observedGeneration"] == body["metadata"]["generation"]
    kinds = {c["type"]: c["status"] for c in body["status"]["conditions"] if c["type"].endswith("Ready")}
    assert kinds == {"Ready": "True", "RouterReady": "True", "PromptPoolReady": "True", "TokenPoolReady": "True"}


def test_only_the_operators_own_deployments_are_listed_and_watched(cluster):
    wait_for(lambda: get_si(cluster["kube"], "tiny"), what="the SplitInference")
    reads = [r for r in cluster["emulator"].emulator._requests
             if r.method == "GET" and r.url.path == "/apis/apps/v1/deployments"]  # kopf's list and watch
    assert reads, "the operator never listed Deployments"
    assert {r.params.get("labelSelector") for r in reads} == {"app.kubernetes.io/managed-by=phasesplit-operator"}


def test_update_patches_children_but_leaves_autoscaled_replicas(cluster):
    kube = cluster["kube"]
    deployment = path("apps/v1", "Deployment", NS, "tiny-prompt")
    kube.patch(deployment, {"spec": {"replicas": 3}})  # the autoscaler scaled the pool up
    before = live_children(kube, "tiny")
    kube.patch(si_path("tiny"), {"spec": {"pools": {
        "prompt": {"engine": {"maxNumSeqs": 8}},
        "token": {"nodeSelector": {"pool": "token"}}}}})
    config = wait_for(lambda: [c for k, c in live_children(kube, "tiny").items() if k.startswith("ConfigMap/tiny-prompt")
                               and c["data"]["PROMPT_MAX_NUM_SEQS"] == "8"], what="a new prompt ConfigMap")
    assert config[0]["immutable"] is True
    token = wait_for(lambda: (d := kube.get(path("apps/v1", "Deployment", NS, "tiny-token")))
                     and d["spec"]["template"]["spec"].get("nodeSelector") and d, what="token nodeSelector")
    assert token["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "token"}
    prompt = kube.get(deployment)
    assert prompt["spec"]["replicas"] == 3, "the operator overwrote replicas the autoscaler owns"
    def config_map(d):
        return d["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["name"]
    assert config_map(prompt) == config[0]["metadata"]["name"] != config_map(before["Deployment/tiny-prompt"])  # pods roll
    assert config_map(token) == config_map(before["Deployment/tiny-token"])  # a prompt-only change: token pods stay
    assert f"ConfigMap/{config_map(before['Deployment/tiny-prompt'])}" in live_children(kube, "tiny"), \
        "old prompt pods that restart before the rollout ends need their ConfigMap"
    generation = prompt["metadata"]["generation"]   # what the Deployment controller reports once rolled out
    kube.patch(path("apps/v1", "Deployment", NS, "tiny-prompt", "status"), {"status": {
        "observedGeneration": generation, "replicas": 3, "updatedReplicas": 3, "readyReplicas": 3, "availableReplicas": 3}})
    wait_for(lambda: f"ConfigMap/{config_map(before['Deployment/tiny-prompt'])}" not in live_children(kube, "tiny"),
             what="the old prompt ConfigMap pruned once the rollout ended")
    unchanged = before["Service/tiny"]["metadata"]["resourceVersion"]
    assert kube.get(path("v1", "Service", NS, "tiny"))["metadata"]["resourceVersion"] == unchanged
    # Removing the nodeSelector from the spec removes it from the Deployment.
    kube.patch(si_path("tiny"), {"spec": {"pools": {"token": {"nodeSelector": None}}}})
    wait_for(lambda: not kube.get(path("apps/v1", "Deployment", NS, "tiny-token"))["spec"]["template"]["spec"]
             .get("nodeSelector"), what="nodeSelector removed")
    body = wait_for(lambda: (b := get_si(kube, "tiny"))
                    and b["status"]["observedGeneration"] == b["metadata"]["generation"] and b,
                    what="observedGeneration")
    assert body["metadata"]["generation"] >= 3


def test_restarted_operator_duplicates_and_changes_nothing(cluster):
    kube = cluster["kube"]
    # The builtin autoscaler has tried the router's metrics (unreachable here) and recorded that.
    wait_for(lambda: any(c["type"] == "MetricsAvailable" for c in get_si(kube, "tiny")["status"]["conditions"]),
             what="the autoscaler's MetricsAvailable condition")
    stop_operator(cluster["proc"])
    before = {k: v["metadata"]["resourceVersion"] for k, v in live_children(kube, "tiny").items()}
    status_before = copy.deepcopy(get_si(kube, "tiny")["status"])
    mark = cluster["log"].stat().st_size
    cluster["proc"] = start_operator(cluster["kubeconfig"], cluster["log"])
    wait_for(lambda: "Handler 'reconcile_fn' succeeded" in cluster["log"].read_text()[mark:], timeout=30,
             what="the resumed reconcile")
    after = {k: v["metadata"]["resourceVersion"] for k, v in live_children(kube, "tiny").items()}
    assert after == before
    assert get_si(kube, "tiny")["status"] == status_before


def test_spec_that_cannot_work_reports_once_and_creates_nothing(cluster):
    kube = cluster["kube"]
    doc = load_example("tiny-cpu")
    doc["metadata"].update(name="too-small", namespace=NS)
    doc["spec"]["pools"]["token"]["engine"]["numKvBlocks"] = 4  # 64 tokens cannot hold maxModelLen 1024
    kube.create(doc)
    body = wait_for(lambda: (b := get_si(kube, "too-small")) and ready_condition(b) and b, what="status")
    ready = ready_condition(body)
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert "pools.token.engine.numKvBlocks" in ready["message"] and body["status"]["phase"] == "Failed"

    def warnings():
        return [e for e in kube.list("v1", "Event", NS) if e.get("reason") == "InvalidSpec"
                and e.get("involvedObject", {}).get("name") == "too-small"]
    events = wait_for(warnings, what="an InvalidSpec event")
    assert "numKvBlocks" in events[0]["message"] and events[0]["type"] == "Warning"
    import time
    time.sleep(3)  # no retry storm: nothing is re-reported, the condition stays as it was
    assert len(warnings()) == 1
    assert ready_condition(get_si(kube, "too-small")) == ready
    assert live_children(kube, "too-small") == {}


def test_fixing_the_spec_brings_it_up(cluster):
    kube = cluster["kube"]
    kube.patch(si_path("too-small"), {"spec": {"pools": {"token": {"engine": {"numKvBlocks": 512}}}}})
    wait_for(lambda: len(live_children(kube, "too-small")) == 11, what="children after the fix")
    body = wait_for(lambda: (b := get_si(kube, "too-small")) and ready_condition(b)["reason"] != "InvalidSpec" and b,
                    what="InvalidSpec cleared")
    assert body["status"]["phase"] == "Pending"


def test_deletion_is_clean(cluster):
    kube = cluster["kube"]
    # An older operator's finalizer is taken off (so that deleting after an uninstall cannot hang).
    doc = load_example("tiny-cpu")
    doc["metadata"].update(name="legacy", namespace=NS, finalizers=["phasesplit.io/finalizer"])
    kube.create(doc)
    wait_for(lambda: not get_si(kube, "legacy")["metadata"].get("finalizers"), what="the old finalizer removed")
    kube.delete(si_path("legacy"))
    kube.delete(si_path("too-small"))
    wait_for(lambda: get_si(kube, "too-small") is None and get_si(kube, "legacy") is None, what="deletion")
    wait_for(lambda: live_children(kube, "too-small") == {}, what="the children garbage-collected")
    import time
    time.sleep(1)
    assert cluster["proc"].poll() is None
    assert cluster["emulator"].emulator.denied == [], "the chart's RBAC refused the operator"
    log = cluster["log"].read_text()
    assert "Traceback" not in log and "[ERROR" not in log, log[-3000:]


def test_uninstalled_operator_leaves_nothing_that_blocks_deletion(cluster):
    kube = cluster["kube"]
    assert not get_si(kube, "tiny")["metadata"].get("finalizers")
    stop_operator(cluster["proc"])  # helm uninstall: the operator is gone, its SplitInferences stay
    kube.delete(si_path("tiny"))
    wait_for(lambda: get_si(kube, "tiny") is None, timeout=5, what="deletion without the operator")
    wait_for(lambda: live_children(kube, "tiny") == {}, timeout=5, what="the children garbage-collected")
