"""Local mode's autoscaling loop against router metrics served over HTTP, with a recording stand-in for
the process launcher (the real one is exercised end to end in test_local_autoscale.py)."""

from __future__ import annotations

import asyncio
import threading

from phasesplit.local.autoscaler import LocalAutoscaler
from phasesplit.local.plan import build_plan, validate_manifest
from support.examples import split_inference


class RecordingCluster:
    """Pool membership as LocalCluster keeps it; starts finish only when the test lets them."""

    def __init__(self, the_plan, base_url: str):
        self.plan, self.base_url = the_plan, base_url
        self.ready = {pool: [f"{pool}-0"] for pool in the_plan.pools}
        self.starting = {pool: [] for pool in the_plan.pools}
        self.events: list[tuple[str, str]] = []
        self.let_start = threading.Event()
        self._serial = 0

    def addresses(self, pool):
        return list(self.ready[pool])

    def replicas(self, pool):
        return len(self.ready[pool]) + len(self.starting[pool])

    def begin_start(self, pool):
        self._serial += 1
        handle = type("Handle", (), {"pool": pool, "name": f"{pool}-{self._serial}"})()
        self.starting[pool].append(handle)
        self.events.append(("start", handle.name))
        return handle

    def finish_start(self, handle):
        self.let_start.wait(10)
        if handle in self.starting[handle.pool]:
            self.starting[handle.pool].remove(handle)
            self.ready[handle.pool].append(handle.name)
            self.events.append(("ready", handle.name))

    def cancel_start(self, pool):
        if not self.starting[pool]:
            return None
        handle = self.starting[pool].pop()
        self.events.append(("cancel", handle.name))
        return handle

    def remove_worker(self, pool):
        self.events.append(("remove", self.ready[pool].pop()))

MANIFEST = split_inference("autoscale", spec={"pools": {pool: {"autoscaling": {
    "minReplicas": 1, "maxReplicas": 2, "metric": "queueTokens", "targetPerReplica": 1000 if pool == "prompt" else 300,
    "scaleUpMaxStep": 1, "scaleDownStabilizationSeconds": 3, "cooldownSeconds": 2}} for pool in ("prompt", "token")}})


def make(router_metrics, tiny_model_dir) -> tuple[LocalAutoscaler, RecordingCluster]:
    cluster = RecordingCluster(build_plan(validate_manifest(MANIFEST), str(tiny_model_dir)), router_metrics.url.removesuffix("/metrics"))
    now = [1000.0]
    autoscaler = LocalAutoscaler(cluster, interval=1.0, clock=lambda: now[0])
    autoscaler.now = now
    return autoscaler, cluster


async def test_a_prompt_queue_starts_a_prompt_worker_and_leaves_the_token_pool(router_metrics, tiny_model_dir):
    autoscaler, cluster = make(router_metrics, tiny_model_dir)
    router_metrics.set_pool("prompt", queue_tokens=5000)
    router_metrics.set_pool("token", queue_tokens=100)
    decisions = await asyncio.to_thread(autoscaler.evaluate_once)
    assert (decisions["prompt"].current, decisions["prompt"].desired) == (1, 2)
    assert not decisions["token"].changed
    assert cluster.events == [("start", "prompt-1")] and cluster.replicas("prompt") == 2

    autoscaler.now[0] += 1   # the worker is still starting: it counts, and is not asked for again
    decisions = await asyncio.to_thread(autoscaler.evaluate_once)
    assert decisions["prompt"].current == 2 and cluster.events == [("start", "prompt-1")]
    cluster.let_start.set()
    autoscaler.stop()
    assert cluster.events[-1] == ("ready", "prompt-1") and cluster.addresses("prompt") == ["prompt-0", "prompt-1"]
    assert [(a.pool, a.decision.desired) for a in autoscaler.history] == [("prompt", 2)]


async def test_a_scale_down_takes_a_starting_worker_before_a_ready_one(router_metrics, tiny_model_dir):
    autoscaler, cluster = make(router_metrics, tiny_model_dir)
    router_metrics.set_pool("prompt", queue_tokens=5000)
    await asyncio.to_thread(autoscaler.evaluate_once)
    router_metrics.set_pool("prompt", queue_tokens=0)
    autoscaler.now[0] += 10   # past the 3 s stabilization window and the 2 s cooldown
    decisions = await asyncio.to_thread(autoscaler.evaluate_once)
    assert (decisions["prompt"].current, decisions["prompt"].desired) == (2, 1)
    cluster.let_start.set()
    autoscaler.stop()
    assert cluster.events == [("start", "prompt-1"), ("cancel", "prompt-1")]
    assert cluster.addresses("prompt") == ["prompt-0"], "the ready worker keeps serving"


async def test_unreadable_metrics_change_nothing(router_metrics, tiny_model_dir):
    autoscaler, cluster = make(router_metrics, tiny_model_dir)
    router_metrics.set_pool("prompt", queue_tokens=5000)
    router_metrics.status = 503
    assert await asyncio.to_thread(autoscaler.evaluate_once) == {}
    assert cluster.events == [] and cluster.replicas("prompt") == 1
