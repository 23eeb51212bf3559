"""Running serving clusters for tests: SplitInference manifests started in local mode, extra
worker processes, and what the router and workers report (metrics, load, leaks)."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import urllib.error
import urllib.request

import grpc

from support import prom
from support.polling import poll, wait_for

from phasesplit import auth
from phasesplit.grpc_auth import Credential
from phasesplit.local import plan as local_plan
from phasesplit.local.launcher import LocalCluster
from phasesplit.local.processes import ManagedProcess, free_port, phasesplit_argv, wait_grpc_serving, wait_http_ok
from phasesplit.v1 import worker_pb2 as pb
from phasesplit.v1 import worker_pb2_grpc as pb_grpc

ENGINE = {"numKvBlocks": 2048, "maxNumSeqs": 64, "maxNumBatchedTokens": 2048}
MAX_MODEL_LEN = 2048
WORKER_TOKEN = auth.new_token()  # the clusters' workers (extra workers started by hand take calls from anyone)
STALL_TIMEOUT = 10.0  # long enough that a loaded 2-core machine is not taken for a stalled worker


def manifest(name: str, pools: dict[str, int], lease: float = 30.0) -> dict:
    return {
        "apiVersion": "phasesplit.io/v1alpha1", "kind": "SplitInference", "metadata": {"name": name},
        "spec": {
            "model": {"name": "tiny", "source": {"hostPath": {"path": "/unused"}}, "dtype": "float32",
                      "maxModelLen": MAX_MODEL_LEN},
            "pools": {pool: {"replicas": n, "autoscaling": {"minReplicas": n, "maxReplicas": max(n, 1)},
                             "engine": ENGINE} for pool, n in pools.items()},
            "kvTransfer": {"timeoutSeconds": 10, "leaseSeconds": lease},
            "router": {"migration": {"stallTimeoutSeconds": STALL_TIMEOUT}},
        },
    }


def start_cluster(doc: dict, model_dir, log_dir: pathlib.Path) -> LocalCluster:
    doc = local_plan.validate_manifest(doc)
    plan = local_plan.build_plan(doc, str(model_dir), port=free_port(), drain_timeout=10)
    log_dir.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(plan, log_dir, ready_timeout=180, worker_token=WORKER_TOKEN)
    try:
        cluster.start()
    except BaseException:
        cluster.stop(5)
        raise
    return cluster


@contextlib.contextmanager
def another_router(cluster: LocalCluster, name: str, log_dir: pathlib.Path, extra_argv: tuple[str, ...] = (),
                   env: dict | None = None, without_model: bool = False):
    """One more router process over the cluster's workers, with the workers' token: its base URL."""
    port = free_port()
    argv = cluster.router_argv(port) + list(extra_argv)
    if without_model:   # as in a cluster: the tokenizer comes from a worker
        at = argv.index("--model")
        argv = argv[:at] + argv[at + 2:]
    proc = ManagedProcess(name, argv, log_dir, env={**os.environ, **(env or {}), auth.TOKEN_ENV: WORKER_TOKEN}).start()
    try:
        wait_http_ok(proc, f"http://127.0.0.1:{port}/health", 60)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop(10)


def start_worker(model_dir, log_dir: pathlib.Path, role: str, *extra: str) -> tuple[ManagedProcess, str]:
    """One more `phasesplit worker` process; returns it and its address once SERVING."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = phasesplit_argv("worker", "--role", role, "--model", str(model_dir), "--served-model-name", "tiny",
                           "--host", "127.0.0.1", "--port", str(port), "--num-kv-blocks", "128",
                           "--max-model-len", "512", *extra)
    proc = ManagedProcess(f"{role}-{port}", argv, log_dir).start()
    try:
        wait_grpc_serving(proc, f"127.0.0.1:{port}", 180)
    except BaseException:
        proc.stop(5)
        raise
    return proc, f"127.0.0.1:{port}"


def worker_channel(address: str, caller: str = auth.ROUTER) -> grpc.Channel:
    """A channel to a cluster's worker that calls as `caller` (the router, unless told otherwise)."""
    credential = Credential(auth.call_metadata(caller, WORKER_TOKEN))
    return grpc.intercept_channel(grpc.insecure_channel(address), credential)


def worker_load(address: str) -> pb.WorkerLoad:
    with worker_channel(address) as channel:
        return pb_grpc.WorkerStub(channel).Load(pb.LoadRequest(), timeout=5)


def metrics(base_url: str) -> prom.Samples:
    """Every sample on the router's /metrics."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=5) as reply:
        return prom.parse(reply.read().decode())


def cluster_state(cluster: LocalCluster) -> dict:
    """What leaks would show: KV blocks and requests each worker holds, requests the router holds."""
    state = {}
    for pool in cluster.plan.pools:
        for address in cluster.addresses(pool):
            load = worker_load(address)
            state[f"{pool} {address}"] = (load.kv_blocks_used, load.pending_transfers, load.running_requests,
                                          load.waiting_requests)
    state["router inflight"] = prom.value(metrics(cluster.base_url), "phasesplit_inflight_requests")
    return state


def wait_quiet(cluster: LocalCluster, timeout: float = 20.0) -> dict:
    """Polls until no worker holds KV or requests and the router has none in flight; returns the last state."""
    return poll(lambda: cluster_state(cluster), _quiet, timeout, interval=0.2)


def _quiet(state: dict) -> bool:
    return all(v == (0, 0, 0, 0) for k, v in state.items() if k != "router inflight") \
        and state["router inflight"] == 0


def post_json(url: str, body, timeout: float = 30.0) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def wait_pool_restored(cluster, pool: str, replicas: int) -> None:
    """Until the supervisor's replacement serves and the router routes to `replicas` workers of the pool."""
    def routable() -> bool:
        with urllib.request.urlopen(f"{cluster.base_url}/admin/pools", timeout=5) as r:
            workers = json.loads(r.read())[pool]["workers"]
        return sum(w["routable"] for w in workers) == replicas
    wait_for(routable, timeout=120, interval=0.5, what=f"{replicas} routable {pool} workers")
