"""The builtin autoscaler timer in a real kopf operator against kmock, reading a router's /metrics over HTTP."""

import asyncio
import functools
import pathlib
import time

import kmock
import kopf
import pytest
import yaml
from conftest import Cluster, running_operator, server_metadata

from phasesplit.operator import autoscaler

pytestmark = pytest.mark.kmock(cls=Cluster)

ROOT = pathlib.Path(__file__).resolve().parents[2]
NS = "ml"
SI = "phasesplit.io/v1alpha1/splitinferences"
DEPLOY = "apps/v1/deployments"
TIMER = (autoscaler.autoscale_timer,
         functools.partial(kopf.timer, "phasesplit.io", "v1alpha1", "splitinferences", interval=0.3))


def split_inference(port: int) -> dict:
    body = yaml.safe_load((ROOT / "manifests" / "examples" / "tiny-cpu.yaml").read_text())
    body["metadata"] = server_metadata("tiny", NS)
    body["spec"]["router"]["service"]["port"] = port
    body["spec"]["autoscaling"]["intervalSeconds"] = 1
    for pool in ("prompt", "token"):
        body["spec"]["pools"][pool]["autoscaling"].update(cooldownSeconds=0, scaleDownStabilizationSeconds=0)
    return body


def deployment(pool: str) -> dict:
    labels = {"app.kubernetes.io/instance": "tiny", "app.kubernetes.io/component": pool}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": server_metadata(f"tiny-{pool}", NS),
            "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": {"containers": []}}}}


def pod(name: str, pool: str, ip: str) -> dict:
    labels = {"app.kubernetes.io/instance": "tiny", "app.kubernetes.io/component": pool}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": server_metadata(name, NS, labels=labels),
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


async def until(check, timeout=8.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.1)
    assert check(), "condition not reached in time"


@pytest.fixture
def cluster(kube, router_metrics):
    kube.objects[SI, NS, "tiny"] = split_inference(router_metrics.port)
    for pool in ("prompt", "token"):
        kube.objects[DEPLOY, NS, f"tiny-{pool}"] = deployment(pool)
    for i, ip in enumerate(["10.0.0.10", "10.0.0.11", "10.0.0.12"]):
        kube.objects["v1/pods", NS, f"tiny-prompt-{i}"] = pod(f"tiny-prompt-{i}", "prompt", ip)
    autoscaler.Kube._apis = None  # the kubeconfig points at this test's server
    return kube


@pytest.fixture
async def router_dns(router_metrics):
    """`tiny-router.ml.svc` resolves to the fixture router, as cluster DNS would."""
    async with kmock.AiohttpInterceptor("127.0.0.1", extra="tiny-router.ml.svc"):
        yield


async def test_pool_replicas_follow_their_own_metrics(cluster, router_metrics, router_dns):
    router_metrics.set_pool("prompt", queue_tokens=1500)   # 512 per replica -> 3
    router_metrics.set_pool("token", inflight=2)           # 8 per replica -> 1
    async with running_operator(cluster.url, TIMER):
        await until(lambda: replicas(cluster, "prompt") == 3)
        assert replicas(cluster, "token") == 1
        await until(lambda: status(cluster).get("autoscaling", {}).get("prompt", {}).get("desired") == 3)
        entry = status(cluster)["autoscaling"]["prompt"]
        assert (entry["current"], entry["metric"], entry["value"]) == (1, "queueTokens", 1500)
        assert "scale up to 3" in entry["reason"] and entry["time"].endswith("Z")
        assert condition(cluster) == "True"
        await until(lambda: events(cluster, "ScaledUp"))
        scaled = events(cluster, "ScaledUp")[0]
        assert "prompt pool 1 -> 3" in scaled["message"]
        assert scaled["involvedObject"]["name"] == "tiny"

        # a decode-heavy phase: the token pool grows, the prompt pool shrinks back, least-loaded pods first
        router_metrics.set_pool("prompt", queue_tokens=0)
        router_metrics.set_pool("token", inflight=20)          # -> 3
        router_metrics.kv_used.labels("10.0.0.10:50051").set(30)
        router_metrics.kv_used.labels("10.0.0.11:50051").set(2)
        router_metrics.kv_used.labels("10.0.0.12:50051").set(11)
        await until(lambda: replicas(cluster, "token") == 3 and replicas(cluster, "prompt") == 1)
        costs = {i: cluster.objects["v1/pods", NS, f"tiny-prompt-{i}"].raw["metadata"]["annotations"]
                 [autoscaler.DELETION_COST] for i in range(3)}
        assert costs == {0: "30", 1: "2", 2: "11"}
        await until(lambda: events(cluster, "ScaledDown"))
        assert any("prompt pool 3 -> 1" in e["message"] for e in events(cluster, "ScaledDown"))


async def test_metrics_down_keeps_replicas_and_sets_the_condition(cluster, router_metrics, router_dns):
    router_metrics.set_pool("prompt", queue_tokens=0)
    router_metrics.set_pool("token", inflight=0)
    async with running_operator(cluster.url, TIMER):
        await until(lambda: condition(cluster) == "True")
        router_metrics.status = 503
        router_metrics.set_pool("prompt", queue_tokens=5000)   # would scale up, but cannot be read
        await until(lambda: condition(cluster) == "False")
        scrapes = router_metrics.scrapes
        await until(lambda: router_metrics.scrapes >= scrapes + 2)
        assert replicas(cluster, "prompt") == 1 and replicas(cluster, "token") == 1
        failed = [c for c in status(cluster)["conditions"] if c["type"] == "MetricsAvailable"][0]
        assert "503" in failed["message"]
        assert events(cluster, "MetricsUnavailable")

        router_metrics.status = 200                            # back: True again, and scaling resumes
        await until(lambda: condition(cluster) == "True" and replicas(cluster, "prompt") == 3)


async def test_other_modes_leave_replicas_alone(cluster, router_metrics, router_dns):
    cluster.objects[SI, NS, "tiny"].raw  # exists
    body = split_inference(router_metrics.port)
    body["spec"]["autoscaling"]["mode"] = "none"
    cluster.objects[SI, NS, "tiny"] = body
    router_metrics.set_pool("prompt", queue_tokens=5000)
    async with running_operator(cluster.url, TIMER):
        await asyncio.sleep(2.5)
    assert router_metrics.scrapes == 0
    assert replicas(cluster, "prompt") == 1
