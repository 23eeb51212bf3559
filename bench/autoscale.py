"""Autoscaled pools against fixed pools, in local mode, on a load that steps up and down.

The load is closed-loop clients whose number and kind change at each step: a few chat-like
clients, then a burst of long prompts with 2-3 token answers, then a burst of short prompts with
long answers, then a few chat-like clients again. It runs first with local mode's autoscaler
(the same policy as the operator), then against fixed pools sized for the average replicas the
autoscaled run used (same run, same machine). Prints, for each step: each pool's replicas and the
seconds from the step to the pool's new replica count being ready, and TTFT and TBT P90 of the
requests sent during the step, autoscaled and fixed, with their ratio.

    python bench/autoscale.py [--model DIR] [--step-seconds 25] [--max-replicas 3]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import pathlib
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import httpx
from serve import Result, one, pct, prompt_of

from phasesplit.engine.tokenizer import Tokenizer
from phasesplit.local.launcher import LocalCluster
from phasesplit.local.autoscaler import LocalAutoscaler
from phasesplit.local.plan import validate_manifest, build_plan
from phasesplit.local.processes import free_port
from phasesplit.tiny_model import make_tiny_model

# kind -> ((prompt tokens lo, hi), (output tokens lo, hi))
KINDS = {"chat": ((100, 200), (20, 40)), "long prompts": ((800, 1000), (2, 3)), "long answers": ((10, 30), (120, 160))}
# (name, clients per kind); each step lasts --step-seconds
STEPS = [("low", {"chat": 2}), ("prompt burst", {"long prompts": 8, "chat": 1}),
         ("decode burst", {"long answers": 8, "chat": 1}), ("low again", {"chat": 2})]
POOLS = ("prompt", "token")


def manifest(model_dir: str, replicas: dict[str, int], max_replicas: int, autoscale: bool) -> dict:
    engine = {"numKvBlocks": 4096, "maxNumSeqs": 64, "maxNumBatchedTokens": 2048}
    targets = {"prompt": 1000, "token": 300}  # queueTokens per replica
    pools = {}
    for pool in POOLS:
        low, high = (1, max_replicas) if autoscale else (replicas[pool], replicas[pool])
        pools[pool] = {"replicas": replicas[pool], "engine": engine, "autoscaling": {
            "minReplicas": low, "maxReplicas": high, "metric": "queueTokens", "targetPerReplica": targets[pool],
            "scaleUpMaxStep": max_replicas, "scaleDownStabilizationSeconds": 15, "cooldownSeconds": 3}}
    return {"apiVersion": "phasesplit.io/v1alpha1", "kind": "SplitInference", "metadata": {"name": "bench"},
            "spec": {"model": {"name": "bench", "source": {"hostPath": {"path": model_dir}}, "dtype": "float32",
                               "maxModelLen": 2048},
                     "autoscaling": {"mode": "builtin" if autoscale else "none", "intervalSeconds": 1},
                     "pools": pools}}


@dataclass
class Sample:
    t: float
    replicas: dict[str, int]   # ready workers in the router


def make_prompts(tokenizer, seed: int = 0, per_kind: int = 16) -> dict[str, list[str]]:
    rng = random.Random(seed)
    return {kind: [prompt_of(tokenizer, rng, rng.randint(*tokens)) for _ in range(per_kind)]
            for kind, (tokens, _) in KINDS.items()}


async def clients_loop(client: httpx.AsyncClient, url: str, kind: str, rng: random.Random, prompts,
                       start: float, until: float, step: str, out: list[tuple[str, Result]]) -> None:
    while time.perf_counter() < until:
        item = (time.perf_counter() - start, kind, rng.choice(prompts[kind]), rng.randint(*KINDS[kind][1]))
        out.append((step, await one(client, url, start, item)))


async def drive(cluster: LocalCluster, prompts, step_seconds: float,
                seed: int = 0) -> tuple[list[tuple[str, Result]], list[float]]:
    """Runs the steps; returns (step, result) per request and each step's start (seconds from the start)."""
    rng = random.Random(seed)
    url = f"{cluster.base_url}/v1/completions"
    out: list[tuple[str, Result]] = []
    step_starts = []
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=50)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        for step, clients in STEPS:
            step_starts.append(time.perf_counter() - start)
            until = time.perf_counter() + step_seconds
            tasks = [clients_loop(client, url, kind, random.Random(rng.random()), prompts, start, until, step, out)
                     for kind, n in clients.items() for _ in range(n)]
            await asyncio.gather(*tasks)
    return out, step_starts


def sample_forever(cluster: LocalCluster, samples: list[Sample], start: float, stop: threading.Event) -> None:
    while not stop.wait(0.2):
        samples.append(Sample(time.perf_counter() - start, {p: len(cluster.addresses(p)) for p in POOLS}))


def run(name: str, model_dir: str, replicas: dict[str, int], max_replicas: int, autoscale: bool,
        step_seconds: float, prompts, log_dir: pathlib.Path):
    doc = validate_manifest(manifest(model_dir, replicas, max_replicas, autoscale))
    the_plan = build_plan(doc, model_dir, port=free_port(), drain_timeout=30)
    (log_dir / name).mkdir(parents=True)
    cluster = LocalCluster(the_plan, log_dir / name, ready_timeout=300)
    samples: list[Sample] = []
    stop = threading.Event()
    autoscaler = None
    try:
        cluster.start()
        asyncio.run(warm_up(cluster))
        if autoscale:
            autoscaler = LocalAutoscaler(cluster, interval=1.0).start()
        start, wall_start = time.perf_counter(), time.time()
        sampler = threading.Thread(target=sample_forever, args=(cluster, samples, start, stop), daemon=True)
        sampler.start()
        results, step_starts = asyncio.run(drive(cluster, prompts, step_seconds))
        if autoscale:
            time.sleep(step_seconds)  # let the last scale-down happen
        history = [(a.pool, a.decision.current, a.decision.desired, a.decision.time - wall_start, a.done_at - wall_start)
                   for a in (autoscaler.history if autoscaler else [])]
        return results, step_starts, samples, history
    finally:
        stop.set()
        if autoscaler is not None:
            autoscaler.stop()
        cluster.stop(15)


async def warm_up(cluster: LocalCluster) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        url = f"{cluster.base_url}/v1/completions"
        await asyncio.gather(*(one(client, url, time.perf_counter(), (0.0, "chat", "warm up", 4)) for _ in range(4)))


def mean_replicas(samples: list[Sample]) -> dict[str, int]:
    """Per pool, the autoscaled run's mean ready replicas, rounded: the fixed run's size."""
    return {p: max(1, round(sum(s.replicas[p] for s in samples) / max(len(samples), 1))) for p in POOLS}


def changes_in_step(history, pool: str, t0: float, t1: float) -> str:
    """The pool's changes decided during the step: "current->desired in S s" (from the step's start
    to the new count being ready: started workers SERVING and in the router, or removed ones out of it)."""
    cells = [f"{a}->{b} in {done - t0:.1f}s" for p, a, b, decided, done in history if p == pool and t0 <= decided < t1]
    return ", ".join(cells) or "-"


def p90(results: list[Result], what: str) -> float:
    ok = [r for r in results if not r.error]
    values = [r.ttft for r in ok] if what == "TTFT" else [x for r in ok for x in r.tbt]
    return pct(values, 90)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model directory (default: write the tiny preset to a temp dir)")
    p.add_argument("--step-seconds", type=float, default=25.0)
    p.add_argument("--max-replicas", type=int, default=3)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("phasesplit").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="phasesplit-autoscale-bench-") as tmp:
        model = args.model or str(make_tiny_model(f"{tmp}/model", seed=0, preset="tiny"))
        prompts = make_prompts(Tokenizer.from_dir(model))
        auto = run("autoscaled", model, {"prompt": 1, "token": 1}, args.max_replicas, True, args.step_seconds,
                   prompts, pathlib.Path(tmp))
        fixed_size = mean_replicas(auto[2])
        fixed = run("fixed", model, fixed_size, args.max_replicas, False, args.step_seconds, prompts,
                    pathlib.Path(tmp))
    report(args, auto, fixed, fixed_size)
    failed = sum(1 for results, *_ in (auto, fixed) for _, r in results if r.error)
    return 0 if failed == 0 else 1


def report(args, auto, fixed, fixed_size: dict[str, int]) -> None:
    print(f"steps of {args.step_seconds:g} s: " + "; ".join(
        f"{name}: " + ", ".join(f"{n} x {kind} {KINDS[kind]}" for kind, n in clients.items())
        for name, clients in STEPS))
    print(f"autoscaled: each pool 1..{args.max_replicas} replicas on queueTokens; "
          f"fixed: prompt={fixed_size['prompt']}, token={fixed_size['token']} (the autoscaled run's mean)")
    header = (f"{'step':<14} {'prompt pool':>30} {'token pool':>30}{'TTFT P90 auto':>15}{'fixed':>9}{'ratio':>7}"
              f"{'TBT P90 auto':>14}{'fixed':>9}{'ratio':>7}{'requests a/f':>14}{'failed a/f':>12}")
    print(header)
    a_results, a_starts, a_samples, history = auto
    f_results = fixed[0]
    ends = a_starts[1:] + [a_starts[-1] + args.step_seconds]
    for (step, _), t0, t1 in zip(STEPS, a_starts, ends):
        cells = [changes_in_step(history, pool, t0, t1) for pool in POOLS]
        a = [r for s, r in a_results if s == step]
        f = [r for s, r in f_results if s == step]
        ttft, ttft_f, tbt, tbt_f = p90(a, "TTFT"), p90(f, "TTFT"), p90(a, "TBT"), p90(f, "TBT")
        print(f"{step:<14} {cells[0]:>30} {cells[1]:>30}{ttft:>15.3f}{ttft_f:>9.3f}{ttft / ttft_f:>7.2f}"
              f"{tbt:>14.4f}{tbt_f:>9.4f}{tbt / tbt_f:>7.2f}{len(a):>8}/{len(f):<5}"
              f"{sum(bool(r.error) for r in a):>6}/{sum(bool(r.error) for r in f)}")
    for name, (results, *_) in (("autoscaled", auto), ("fixed", fixed)):
        errors = [(s, r.error) for s, r in results if r.error]
        print(f"{name}: {len(errors)} failed requests" + (f" (first: {errors[0]})" if errors else ""))
    mean = {p: sum(s.replicas[p] for s in a_samples) / max(len(a_samples), 1) for p in POOLS}
    print("mean ready replicas, autoscaled: " + ", ".join(f"{p} {mean[p]:.2f}" for p in POOLS))


if __name__ == "__main__":
    sys.exit(main())
