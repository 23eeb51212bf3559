"""Faults under load, with migration on and off, in the same run.

Local mode with 2 prompt + 2 token workers on the tiny model; a steady load of streaming requests
(greedy and seeded); on a schedule a token worker is SIGKILLed, a token worker is SIGSTOPped past
the stall timeout and then SIGCONTed, a prompt worker is SIGKILLed (local mode restarts dead
workers). Prints requests completed, migrated and failed, the added latency per migration (from a
worker's failure to the request's next token, P50/P99 from the router's histogram) and the KV
blocks still in use on every worker at the end (must be 0). The second run has migration turned off
(`spec.router.migration.maxAttempts: 0`): the failures it prevents, measured on the same schedule.

    python bench/chaos.py [--model DIR] [--seconds 45] [--clients 8] [--fault-every 6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import random
import signal
import tempfile
import threading
import time
from dataclasses import dataclass

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families

from phasesplit.control.router_metrics import histogram_quantile
from phasesplit.local.launcher import LocalCluster
from phasesplit.local.plan import build_plan, validate_manifest
from phasesplit.local.processes import free_port
from phasesplit.tiny_model import make_tiny_model
from phasesplit.v1 import worker_pb2 as pb
from phasesplit.v1 import worker_pb2_grpc as pb_grpc

WORDS = "the quick brown fox jumps over a lazy dog while prompt and token phases split across machines".split()
STALL_TIMEOUT = 3.0


@dataclass
class Tally:
    completed: int = 0
    failed: int = 0        # the stream broke after output had started (an error event, or cut)
    refused: int = 0       # no output at all (an HTTP error status)
    faults: int = 0


def manifest(max_attempts: int) -> dict:
    engine = {"numKvBlocks": 2048, "maxNumSeqs": 64, "maxNumBatchedTokens": 2048}
    return {"apiVersion": "phasesplit.io/v1alpha1", "kind": "SplitInference", "metadata": {"name": "chaos"},
            "spec": {"model": {"name": "tiny", "source": {"hostPath": {"path": "/unused"}}, "maxModelLen": 2048},
                     "pools": {p: {"replicas": 2, "autoscaling": {"minReplicas": 2, "maxReplicas": 2}, "engine": engine}
                               for p in ("prompt", "token")},
                     "kvTransfer": {"timeoutSeconds": 5, "leaseSeconds": 10},
                     "router": {"migration": {"maxAttempts": max_attempts, "stallTimeoutSeconds": STALL_TIMEOUT}}}}


async def client(base_url: str, seed: int, until: float, tally: Tally) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=120) as http:
        while time.monotonic() < until:
            body = {"model": "tiny", "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 300))),
                    "max_tokens": rng.randint(64, 160), "ignore_eos": True, "stream": True,
                    "temperature": rng.choice([0.0, 1.0]), "seed": rng.randrange(1000)}
            outcome = "refused"
            try:
                async with http.stream("POST", f"{base_url}/v1/completions", json=body) as reply:
                    if reply.status_code == 200:
                        outcome = "failed"
                        async for line in reply.aiter_lines():
                            if '"finish_reason": "length"' in line:
                                outcome = "completed"
            except httpx.HTTPError:
                pass
            setattr(tally, outcome, getattr(tally, outcome) + 1)
            if outcome != "completed":
                await asyncio.sleep(0.5)


def faults(cluster: LocalCluster, every: float, until: float, tally: Tally, stop: threading.Event) -> None:
    schedule = ["kill token", "stall token", "kill prompt"]
    i = 0
    while not stop.wait(every) and time.monotonic() < until - every:
        action, pool = schedule[i % len(schedule)].split()
        i += 1
        while time.monotonic() < until and not (len(cluster.workers[pool]) == 2 and
                                                 all(h.proc.alive() for h in cluster.workers[pool])):
            stop.wait(0.5)   # one fault at a time: the pool is whole again first
        if time.monotonic() >= until - every:
            return
        victim = cluster.workers[pool][i % 2]
        tally.faults += 1
        if action == "kill":
            os.kill(victim.proc.pid, signal.SIGKILL)
        else:
            os.kill(victim.proc.pid, signal.SIGSTOP)
            stop.wait(STALL_TIMEOUT + 2)
            os.kill(victim.proc.pid, signal.SIGCONT)


def router_samples(base_url: str) -> dict:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def kv_blocks_in_use(cluster: LocalCluster) -> int | None:
    """Blocks in use over every worker; None while one does not answer (killed, its replacement starting)."""
    used = 0
    for pool in cluster.plan.pools:
        for address in cluster.addresses(pool):
            try:
                with grpc.insecure_channel(address) as channel:
                    used += pb_grpc.WorkerStub(channel).Load(pb.LoadRequest(), timeout=10).kv_blocks_used
            except grpc.RpcError:
                return None
    return used


def run(model_dir: str, max_attempts: int, args, log_dir: pathlib.Path) -> dict:
    plan = build_plan(validate_manifest(manifest(max_attempts)), model_dir, port=free_port(), drain_timeout=5)
    log_dir.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(plan, log_dir, ready_timeout=180)
    cluster.start()
    supervisor = cluster.supervise(0.5)
    tally, stop = Tally(), threading.Event()
    try:
        until = time.monotonic() + args.seconds
        chaos = threading.Thread(target=faults, args=(cluster, args.fault_every, until, tally, stop))
        chaos.start()

        async def load():
            await asyncio.gather(*(client(cluster.base_url, s, until, tally) for s in range(args.clients)))
        asyncio.run(load())
        stop.set()
        chaos.join()
        time.sleep(STALL_TIMEOUT + 2)      # stalled streams cancelled, dead workers replaced, leases run out
        samples = router_samples(cluster.base_url)
        migrated = sum(v for (name, labels), v in samples.items()
                       if name == "phasesplit_migrations_total" and ("stage", "mid_stream") in labels)
        retried = sum(v for (name, labels), v in samples.items()
                      if name == "phasesplit_migrations_total" and ("stage", "before_output") in labels)
        buckets = [(float(dict(labels)["le"]), v) for (name, labels), v in samples.items()
                   if name == "phasesplit_migration_resume_seconds_bucket"]
        deadline = time.monotonic() + 60
        while (in_use := kv_blocks_in_use(cluster)) != 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        return {"migration": "on" if max_attempts else "off", "faults": tally.faults, "completed": tally.completed,
                "failed": tally.failed, "refused": tally.refused, "migrated": int(migrated), "retried before output": int(retried),
                "resume p50 s": histogram_quantile(0.5, buckets), "resume p99 s": histogram_quantile(0.99, buckets),
                "kv blocks in use at end": in_use}
    finally:
        supervisor.set()
        cluster.stop(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model directory (default: the tiny model, made in a temporary directory)")
    p.add_argument("--seconds", type=float, default=45.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--fault-every", type=float, default=6.0)
    args = p.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="phasesplit-chaos-"))
    model_dir = args.model or str(make_tiny_model(work / "model", seed=0, preset="tiny"))
    results = [run(model_dir, attempts, args, work / f"logs-{attempts}") for attempts in (3, 0)]
    print(f"chaos: {args.seconds:g} s, {args.clients} streaming clients, a fault every {args.fault_every:g} s "
          f"(kill token, stall token {STALL_TIMEOUT + 2:g} s, kill prompt), logs in {work}")
    for r in results:
        print(json.dumps(r))
    on, off = results
    print(f"streams broken after output started: {on['failed']} with migration, {off['failed']} without")


if __name__ == "__main__":
    main()
