"""The builtin autoscaler in a real kopf operator (every handler the operator registers) against the
emulator, reading a router's /metrics over HTTP."""

import asyncio

import kmock
import pytest
from support.examples import split_inference
from support.kube_emulator import Emulator
from support.operator_harness import in_process_operator, server_metadata
from support.polling import eventually

from phasesplit.operator import autoscaler, builders
from phasesplit.control.spec import SplitInferenceSpec

pytestmark = pytest.mark.kmock(cls=Emulator)

NS = "ml"
SI = "phasesplit.io/v1alpha1/splitinferences"
DEPLOY = "apps/v1/deployments"


def split_inference_body(port: int, mode: str = "builtin") -> dict:
    fast = {"cooldownSeconds": 0, "scaleDownStabilizationSeconds": 0}
    body = split_inference("tiny", NS, spec={"router": {"service": {"port": port}},
                                              "autoscaling": {"intervalSeconds": 1, "mode": mode},
                                              "pools": {"prompt": {"autoscaling": fast}, "token": {"autoscaling": fast}}})
    body["metadata"] = server_metadata("tiny", NS)
    return body


def deployment(body: dict, pool: str) -> dict:
    """The pool Deployment exactly as the operator's builders render it."""
    owner = builders.Owner("tiny", NS, body["metadata"]["uid"])
    d = builders.build_pool_deployment(owner, SplitInferenceSpec.model_validate(body["spec"]), pool)
    d["metadata"].update(server_metadata(d["metadata"]["name"], NS))
    return d


def pod(name: str, pool: str, ip: str) -> dict:
    owner = builders.Owner("tiny", NS, "")
    meta = server_metadata(name, NS, labels=builders.labels(owner, pool))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"containers": [{"name": "worker"}]},
            "status": {"podIP": ip, "phase": "Running"}}


def replicas(cluster, pool: str) -> int:
    return cluster.objects[DEPLOY, NS, f"tiny-{pool}"].raw["spec"]["replicas"]


def status(cluster) -> dict:
    return cluster.objects[SI, NS, "tiny"].raw.get("status", {})


def condition(cluster) -> str | None:
    found = [c for c in status(cluster).get("conditions", []) if c["type"] == "MetricsAvailable"]
    return found[0]["status"] if found else None


def events(cluster, reason: str) -> list[dict]:
    return [o.raw for (res, _, _), o in cluster.objects.items()
            if res == kmock.resource("v1/events") and o.raw.get("reason") == reason]


@pytest.fixture
def cluster(kmock, router_metrics, tmp_path):
    body = split_inference_body(router_metrics.port)
    kmock.objects[SI, NS, "tiny"] = body
    for pool in ("prompt", "token"):
        kmock.objects[DEPLOY, NS, f"tiny-{pool}"] = deployment(body, pool)
    for i, ip in enumerate(["10.0.0.10", "10.0.0.11", "10.0.0.12"]):
        kmock.objects["v1/pods", NS, f"tiny-prompt-{i}"] = pod(f"tiny-prompt-{i}", "prompt", ip)
    kmock.objects["v1/pods", NS, "tiny-token-0"] = pod("tiny-token-0", "token", "10.0.0.20")
    return kmock


@pytest.fixture
def operator(cluster, tmp_path, monkeypatch):
    """Every handler of the operator in this event loop (call it to start)."""
    return in_process_operator(cluster, tmp_path, monkeypatch)


@pytest.fixture
async def router_dns(router_metrics):
    """The router Service `tiny.ml.svc` resolves to the fixture router, as cluster DNS would."""
    async with kmock.AiohttpInterceptor("127.0.0.1", extra="tiny.ml.svc"):
        yield


async def test_pool_replicas_follow_their_own_metrics(cluster, operator, router_metrics, router_dns):
    router_metrics.set_pool("prompt", queue_tokens=1500)   # 512 per replica -> 3
    router_metrics.set_pool("token", inflight=2)           # 8 per replica -> 1
    async with operator():
        await eventually(lambda: replicas(cluster, "prompt") == 3, timeout=8)
        assert replicas(cluster, "token") == 1
        await eventually(lambda: status(cluster).get("autoscaling", {}).get("prompt", {}).get("desired") == 3, timeout=8)
        entry = status(cluster)["autoscaling"]["prompt"]
        assert (entry["current"], entry["metric"], entry["value"]) == (1, "queueTokens", 1500)
        assert "scale up to 3" in entry["reason"] and entry["time"].endswith("Z")
        assert condition(cluster) == "True"
        await eventually(lambda: events(cluster, "ScaledUp"), timeout=8)
        scaled = events(cluster, "ScaledUp")[0]
        assert "prompt pool 1 -> 3" in scaled["message"]
        assert scaled["involvedObject"]["name"] == "tiny"

        # a decode-heavy phase: the token pool grows, the prompt pool shrinks back, least-loaded pods first
        router_metrics.set_pool("prompt", queue_tokens=0)
        router_metrics.set_pool("token", inflight=20)          # -> 3
        router_metrics.kv_blocks_used.labels("10.0.0.10:50051").set(30)
        router_metrics.kv_blocks_used.labels("10.0.0.11:50051").set(2)
        router_metrics.kv_blocks_used.labels("10.0.0.12:50051").set(11)
        await eventually(lambda: replicas(cluster, "token") == 3 and replicas(cluster, "prompt") == 1, timeout=8)
        costs = {i: cluster.objects["v1/pods", NS, f"tiny-prompt-{i}"].raw["metadata"]["annotations"]
                 [autoscaler.DELETION_COST] for i in range(3)}
        assert costs == {0: "30", 1: "2", 2: "11"}
        await eventually(lambda: events(cluster, "ScaledDown"), timeout=8)
        assert any("prompt pool 3 -> 1" in e["message"] for e in events(cluster, "ScaledDown"))
    assert cluster.denied == [], "the chart's RBAC refused the operator"


async def test_metrics_down_keeps_replicas_and_sets_the_condition(cluster, operator, router_metrics, router_dns):
    router_metrics.set_pool("prompt", queue_tokens=0)
    router_metrics.set_pool("token", inflight=0)
    async with operator():
        await eventually(lambda: condition(cluster) == "True", timeout=8)
        router_metrics.status = 503
        router_metrics.set_pool("prompt", queue_tokens=5000)   # would scale up, but cannot be read
        await eventually(lambda: condition(cluster) == "False", timeout=8)
        scrapes = router_metrics.scrapes
        await eventually(lambda: router_metrics.scrapes >= scrapes + 2, timeout=8)
        assert replicas(cluster, "prompt") == 1 and replicas(cluster, "token") == 1
        failed = [c for c in status(cluster)["conditions"] if c["type"] == "MetricsAvailable"][0]
        assert "503" in failed["message"]
        assert events(cluster, "MetricsUnavailable")
        # Another failure text while still failing: the status is not rewritten on every tick.
        written = cluster.objects[SI, NS, "tiny"].raw["metadata"]["resourceVersion"]
        router_metrics.status = 500
        scrapes = router_metrics.scrapes
        await eventually(lambda: router_metrics.scrapes >= scrapes + 2, timeout=8)
        assert cluster.objects[SI, NS, "tiny"].raw["metadata"]["resourceVersion"] == written

        router_metrics.status = 200                            # back: True again, and scaling resumes
        await eventually(lambda: condition(cluster) == "True" and replicas(cluster, "prompt") == 3, timeout=8)


@pytest.mark.parametrize("mode", ["none", "hpa"])
async def test_other_modes_leave_replicas_alone(cluster, operator, router_metrics, router_dns, mode):
    cluster.objects[SI, NS, "tiny"] = split_inference_body(router_metrics.port, mode=mode)
    router_metrics.set_pool("prompt", queue_tokens=5000)
    async with operator():
        await asyncio.sleep(2.5)
    assert router_metrics.scrapes == 0
    assert replicas(cluster, "prompt") == 1


async def test_a_pool_at_zero_comes_back_when_the_router_queues_for_it(cluster, operator, router_metrics, router_dns):
    body = split_inference_body(router_metrics.port)
    body["spec"]["pools"]["token"].update(replicas=0)
    # kvUtilization, a pool average, is 0 without workers: only the held request shows the demand
    body["spec"]["pools"]["token"]["autoscaling"].update(minReplicas=0, metric="kvUtilization", targetPerReplica=0.8)
    cluster.objects[SI, NS, "tiny"] = body
    cluster.objects[DEPLOY, NS, "tiny-token"] = deployment(body, "token")
    assert replicas(cluster, "token") == 0
    router_metrics.set_pool("prompt", queue_tokens=0)
    router_metrics.set_pool("token", queue_requests=1, queue_tokens=16, inflight=1)  # one request held, no worker
    async with operator():
        await eventually(lambda: replicas(cluster, "token") == 1, timeout=8)
        await eventually(lambda: "scale from zero" in
                         status(cluster).get("autoscaling", {}).get("token", {}).get("reason", ""), timeout=8)
        assert any("token pool 0 -> 1" in e["message"] for e in events(cluster, "ScaledUp"))

        router_metrics.set_pool("token", queue_requests=0, queue_tokens=0, inflight=0)  # served, idle again
        await eventually(lambda: replicas(cluster, "token") == 0, timeout=8)
    assert cluster.denied == [], "the chart's RBAC refused the operator"
