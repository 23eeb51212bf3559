"""Simulated workers against the simulator: one trace through a `phasesplit local` fleet of
`--engine sim` workers (real processes, gRPC, router, engine scheduler and KV blocks) and through
`phasesplit simulate` (the discrete-event model), with the same pools, model and hardware.

The fleet runs in slow motion (`--time-scale`: every modelled time lasts that many times longer,
and so do the trace's gaps) so that the CPU this machine spends per request and token stays small
next to the modelled times; measured times are divided by the scale again. Prints TTFT, TBT and
E2E at P50/P90 of both, their ratio, and whether each lies within --tolerance.

    python bench/fleet_agreement.py --trace code --rate 6 --requests 200 \\
        --prompt h100-80gb:8 --token h100-80gb:8 --time-scale 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import pathlib
import sys
import tempfile
import time

import aiohttp

from phasesplit.fleet.perf import Profiles
from phasesplit.fleet.report import summarize
from phasesplit.fleet.sim import Outcome, PoolSpec, SimConfig, simulate
from phasesplit.fleet.trace import load_trace, redraw
from phasesplit.local import plan as local_plan
from phasesplit.local.launcher import LocalCluster
from phasesplit.local.processes import free_port
from phasesplit.tiny_model import make_tiny_model

MODEL, TP = "llama2-70b", 8
METRICS, QUANTILES = ("ttft", "tbt", "e2e"), ("p50", "p90")


def manifest(pools: dict[str, PoolSpec], instances: dict[str, int], max_len: int, scale: float) -> dict:
    hardware = {role: p.hardware for role, p in pools.items()}
    return {
        "apiVersion": "phasesplit.io/v1alpha1", "kind": "SplitInference", "metadata": {"name": "agreement"},
        "spec": {
            "model": {"name": "sim", "source": {"hostPath": {"path": "/unused"}}, "maxModelLen": max_len,
                      "simulated": {"model": MODEL, "tensorParallel": TP, "timeScale": scale,
                                    "hardware": next(iter(hardware.values())), "poolHardware": hardware}},
            "pools": {role: {"replicas": n, "autoscaling": {"minReplicas": n, "maxReplicas": n},
                             # as `simulate` models a split design: whole prefills, no prefix cache (the
                             # trace's prompts are all alike, and would all hit it)
                             "engine": {"maxNumSeqs": 64, "maxNumBatchedTokens": 2048, "chunkedPrefill": False,
                                        "prefixCaching": False}}
                      for role, n in instances.items()},
            "kvTransfer": {"timeoutSeconds": 600, "leaseSeconds": 600},
            "autoscaling": {"mode": "none"},
        },
    }


async def one_request(session, url: str, n_prompt: int, n_output: int, at: float, t0: float, scale: float):
    await asyncio.sleep(max(0.0, t0 + at * scale - time.monotonic()))
    body = {"model": "sim", "prompt": [9] * n_prompt, "max_tokens": n_output, "stream": True}
    first = None
    async with session.post(url, json=body) as reply:
        if reply.status != 200:
            raise RuntimeError(f"HTTP {reply.status}: {await reply.text()}")
        async for line in reply.content:
            if first is None and line.startswith(b"data: {"):
                first = time.monotonic()
    finish = time.monotonic()
    return (first - t0) / scale, (finish - t0) / scale


async def replay(base_url: str, trace, scale: float) -> tuple[list[float], list[float]]:
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.monotonic() + 1.0
        results = await asyncio.gather(*(
            one_request(session, f"{base_url}/v1/completions", int(p), int(o), float(a), t0, scale)
            for a, p, o in zip(trace.arrival, trace.prompt, trace.output)))
    return [r[0] for r in results], [r[1] for r in results]


def pss_mib(pid: int) -> float:
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", default="code")
    p.add_argument("--rate", type=float, default=6.0, help="requests/s in model time")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--prompt", default="h100-80gb:8")
    p.add_argument("--token", default="h100-80gb:8")
    p.add_argument("--time-scale", type=float, default=4.0)
    p.add_argument("--tolerance", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", help="tokenizer and config.json (default: a tiny model made here)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)

    pools = {"prompt": PoolSpec.parse("prompt", args.prompt), "token": PoolSpec.parse("token", args.token)}
    profiles = Profiles()
    trace = redraw(load_trace(args.trace), args.rate, args.requests, args.seed)
    config = SimConfig(MODEL, TP, tuple(pools.values()))
    t = time.perf_counter()
    simulated = summarize(simulate(config, profiles, trace))
    print(f"simulate: {len(trace)} requests in {time.perf_counter() - t:.2f} s; utilisation "
          + ", ".join(f"{r} {v['utilization']:.0%}" for r, v in simulated["pools"].items()), flush=True)

    instances = {r: s.machines * profiles.get(MODEL, s.hardware, TP).instances_per_machine for r, s in pools.items()}
    max_len = int(max(trace.prompt + trace.output)) + 16
    work = pathlib.Path(tempfile.mkdtemp(prefix="fleet-agreement-"))
    model_dir = args.model_dir or str(make_tiny_model(work / "tiny"))
    doc = local_plan.validate_manifest(manifest(pools, instances, max_len, args.time_scale))
    plan = local_plan.build_plan(doc, model_dir, port=free_port(), drain_timeout=10)
    (work / "logs").mkdir()
    cluster = LocalCluster(plan, work / "logs", ready_timeout=900)
    t = time.perf_counter()
    try:
        cluster.start()
        started = time.perf_counter() - t
        workers = [proc for proc in cluster.processes() if proc is not cluster.router]
        print(f"local: {len(workers)} simulated workers and the router ready in {started:.0f} s "
              f"(logs {work / 'logs'})", flush=True)
        t = time.perf_counter()
        first, finish = asyncio.run(replay(cluster.base_url, trace, args.time_scale))
        wall = time.perf_counter() - t
        memory = [pss_mib(proc.pid) for proc in workers]
    finally:
        cluster.stop(15)
    measured = summarize(Outcome(list(trace.arrival), list(trace.prompt), list(trace.output), first, finish,
                                 duration=max(finish)))

    rows, ok = [], True
    print(f"\nreplay: {wall:.0f} s wall at time scale {args.time_scale:g}; worker memory (PSS) "
          f"{sum(memory) / len(memory):.0f} MiB each, {sum(memory) / 1024:.1f} GiB for {len(memory)}")
    print(f"{'metric':<10}{'local (s)':>12}{'simulate (s)':>14}{'ratio':>8}")
    for m in METRICS:
        for q in QUANTILES:
            a, b = measured[f"{m}_s"][q], simulated[f"{m}_s"][q]
            ratio = a / b if b else math.nan
            within = abs(ratio - 1) <= args.tolerance
            ok &= within
            rows.append({"metric": m, "quantile": q, "local_s": a, "simulate_s": b, "ratio": round(ratio, 3)})
            print(f"{m + ' ' + q:<10}{a:>12.4f}{b:>14.4f}{ratio:>8.3f}{'' if within else '  outside'}")
    print(f"throughput: local {measured['throughput_rps']:.3f} req/s, simulate {simulated['throughput_rps']:.3f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "wall_s": wall,
                                                       "worker_pss_mib": memory}, indent=2))
    print("all within tolerance" if ok else "NOT all within tolerance")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
