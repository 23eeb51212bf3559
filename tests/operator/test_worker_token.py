"""The worker-token Secret deleted while the operator runs: the resync makes it anew, with the
`create` on Secrets that the chart grants and nothing more, and every pod template rolls onto it."""

import asyncio

import kmock
import pytest
from support.examples import split_inference
from support.kube_emulator import Emulator
from support.operator_harness import in_process_operator, kube_client, server_metadata
from support.polling import eventually

from phasesplit.operator import builders, handlers
from phasesplit.operator.kube import path

pytestmark = pytest.mark.kmock(cls=Emulator)

NS = "default"
SI = "phasesplit.io/v1alpha1/splitinferences"
SECRET = (kmock.resource("v1/secrets"), NS, "tiny-worker-token")


@pytest.fixture
def cluster(kmock):
    body = split_inference("tiny", NS, spec={"autoscaling": {"mode": "none"}})
    body["metadata"] = server_metadata("tiny", NS)
    kmock.objects[SI, NS, "tiny"] = body
    return kmock


def secret(cluster) -> dict | None:
    obj = cluster.objects[SECRET] if SECRET in cluster.objects else None
    return None if obj is None or obj.deleted else obj.raw


def revisions(cluster) -> set:
    """The token revision on the router's and the pools' pod templates (None: not there yet)."""
    found = set()
    for role in ("router", "prompt", "token"):
        key = (kmock.resource("apps/v1/deployments"), NS, f"tiny-{role}")
        template = cluster.objects[key].raw["spec"]["template"] if key in cluster.objects else {"metadata": {}}
        found.add(template["metadata"].get("annotations", {}).get(builders.TOKEN_REVISION_ANNOTATION))
    return found


async def test_a_deleted_worker_token_secret_is_made_anew_and_the_pods_roll_onto_it(cluster, tmp_path, monkeypatch):
    monkeypatch.setattr(handlers, "RESYNC_SECONDS", 1.0)
    async with in_process_operator(cluster, tmp_path, monkeypatch)():
        first = await eventually(lambda: secret(cluster), what="the worker-token Secret")
        await eventually(lambda: revisions(cluster) == {first["metadata"]["uid"]}, what="the pods on its token")
        await asyncio.to_thread(kube_client(str(cluster.url)).delete, path("v1", "Secret", NS, "tiny-worker-token"))
        second = await eventually(lambda: secret(cluster), timeout=20, what="the Secret made anew")
        await eventually(lambda: revisions(cluster) == {second["metadata"]["uid"]}, what="the pods rolled onto it")
    assert second["data"] != first["data"]
    assert cluster.denied == [], "the chart's RBAC refused the operator"
