"""Split serving against colocated serving, in local mode, on one trace.

Replays Poisson arrivals of two Splitwise-like workloads (coding: long prompts, short answers;
conversation: shorter prompts, longer answers) through the router's streaming completions API,
first against P prompt + T token workers, then against P + T mixed workers, in the same run.
Prints throughput and time to first token (TTFT), time between tokens (TBT) and end-to-end
latency at P50/P90/P99 for each, and the split/mixed ratios.

    python bench/serve.py [--model DIR] [--preset tiny|small] [--requests 60] [--rate 4]
                          [--prompt-workers 1] [--token-workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx

from phasesplit.engine.tokenizer import Tokenizer
from phasesplit.local.launcher import LocalCluster
from phasesplit.local.plan import validate_manifest, build_plan
from phasesplit.local.processes import free_port
from phasesplit.tiny_model import make_tiny_model

# (prompt tokens, output tokens) ranges, scaled from Splitwise's traces (coding: median prompt
# 1500, output 13; conversation: prompt 1020, output 129) to what a CPU serves in a minute.
WORKLOADS = {"coding": ((600, 1000), (4, 16)), "conversation": ((100, 400), (48, 160))}
WORDS = "def return class import value token layer cache prompt phase split worker pool queue".split()


@dataclass
class Result:
    workload: str
    arrival: float
    ttft: float = 0.0
    tbt: list[float] = field(default_factory=list)
    e2e: float = 0.0
    tokens: int = 0
    error: str = ""


def make_trace(n: int, rate: float, tokenizer: Tokenizer, seed: int = 0) -> list[tuple[float, str, str, int]]:
    """(arrival second, workload, prompt text, max_tokens) with exponential inter-arrival times."""
    rng = random.Random(seed)
    t, trace = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        workload = rng.choice(list(WORKLOADS))
        (p_lo, p_hi), (o_lo, o_hi) = WORKLOADS[workload]
        trace.append((t, workload, prompt_of(tokenizer, rng, rng.randint(p_lo, p_hi)), rng.randint(o_lo, o_hi)))
    return trace


def prompt_of(tokenizer: Tokenizer, rng: random.Random, tokens: int) -> str:
    words = [rng.choice(WORDS) for _ in range(tokens)]
    while len(tokenizer.encode(" ".join(words))) > tokens:
        words = words[: max(1, int(len(words) * 0.9))]
    return " ".join(words)


async def one(client: httpx.AsyncClient, url: str, start: float, item) -> Result:
    arrival, workload, prompt, max_tokens = item
    await asyncio.sleep(max(0.0, start + arrival - time.perf_counter()))
    result = Result(workload, arrival)
    sent = last = time.perf_counter()
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", url, json=body) as reply:
            if reply.status_code != 200:
                result.error = f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}"
                return result
            async for line in reply.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                if not result.ttft:
                    result.ttft = now - sent
                else:
                    result.tbt.append(now - last)
                last = now
    except httpx.HTTPError as exc:
        result.error = repr(exc)
    result.e2e = time.perf_counter() - sent
    return result


async def replay(base_url: str, trace) -> tuple[list[Result], float]:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, f"{base_url}/v1/completions", start, i) for i in trace))
        return results, time.perf_counter() - start


def manifest(pools: dict[str, int], model_dir: str) -> dict:
    engine = {"numKvBlocks": 1024, "maxNumSeqs": 64, "maxNumBatchedTokens": 2048}
    return {"apiVersion": "phasesplit.io/v1alpha1", "kind": "SplitInference", "metadata": {"name": "bench"},
            "spec": {"model": {"name": "bench", "source": {"hostPath": {"path": model_dir}}, "dtype": "float32",
                               "maxModelLen": 2048},
                     "pools": {p: {"replicas": n, "autoscaling": {"minReplicas": n, "maxReplicas": n},
                                   "engine": engine} for p, n in pools.items()}}}


def run(name: str, pools: dict[str, int], model_dir: str, trace, log_dir: pathlib.Path):
    the_plan = build_plan(validate_manifest(manifest(pools, model_dir)), model_dir, port=free_port(), drain_timeout=10)
    cluster = LocalCluster(the_plan, log_dir / name, ready_timeout=300)
    (log_dir / name).mkdir(parents=True)
    try:
        cluster.start()
        asyncio.run(replay(cluster.base_url, trace[:4]))  # warm-up
        return asyncio.run(replay(cluster.base_url, trace))
    finally:
        cluster.stop(15)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def summarize(results: list[Result], seconds: float) -> dict:
    ok = [r for r in results if not r.error]
    row = {"ok": len(ok), "failed": len(results) - len(ok), "req/s": len(ok) / seconds,
           "tok/s": sum(r.tokens for r in ok) / seconds}
    for name, values in (("TTFT", [r.ttft for r in ok]), ("TBT", [x for r in ok for x in r.tbt]),
                         ("E2E", [r.e2e for r in ok])):
        for q in (50, 90, 99):
            row[f"{name} P{q}"] = pct(values, q)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model directory (default: write --preset to a temp dir)")
    p.add_argument("--preset", default="tiny", choices=("tiny", "small"))
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second (Poisson)")
    p.add_argument("--prompt-workers", type=int, default=1)
    p.add_argument("--token-workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="phasesplit-serve-bench-") as tmp:
        model = args.model or str(make_tiny_model(f"{tmp}/model", seed=0, preset=args.preset))
        trace = make_trace(args.requests, args.rate, Tokenizer.from_dir(model), args.seed)
        n = args.prompt_workers + args.token_workers
        runs = {
            f"split {args.prompt_workers}P+{args.token_workers}T": run(
                "split", {"prompt": args.prompt_workers, "token": args.token_workers}, model, trace, pathlib.Path(tmp)),
            f"mixed {n}M": run("mixed", {"mixed": n}, model, trace, pathlib.Path(tmp)),
        }
    print(f"{args.requests} requests, Poisson {args.rate}/s, coding {WORKLOADS['coding']} and conversation "
          f"{WORKLOADS['conversation']} (prompt, output) tokens, preset {args.preset}")
    rows = {name: summarize(*r) for name, r in runs.items()}
    for workload in WORKLOADS:
        for name, (results, seconds) in runs.items():
            rows[f"{name} {workload}"] = summarize([r for r in results if r.workload == workload], seconds)
    keys = list(next(iter(rows.values())))
    print(f"{'':<30}" + "".join(f"{k:>11}" for k in keys))
    for name, row in rows.items():
        print(f"{name:<30}" + "".join(f"{row[k]:>11.3f}" if isinstance(row[k], float) else f"{row[k]:>11}"
                                      for k in keys))
    split_row, mixed_row = rows[list(runs)[0]], rows[list(runs)[1]]
    print("split / mixed: " + ", ".join(f"{k} {split_row[k] / mixed_row[k]:.2f}" for k in keys
                                        if k not in ("ok", "failed") and mixed_row[k]))
    return 0 if all(r["failed"] == 0 for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
