"""Admission control under a burst: what the admitted requests pay for the excess that is refused.

Local mode, tiny model, 1 prompt + 1 token worker (a decode batch of 16), the router's
`maxQueueWaitSeconds: 5`. On one cluster, in turn for each round: the burst sends 120 streams at
once, the baseline then sends only as many as the burst got served (no excess). Prints, for each run,
how many were served and refused (429), the served streams' end-to-end P50/P90, their decode time
(first token to last: what a stream costs once admitted, without its wait for a place), the time to
the first token of the first batch's worth (the streams admitted at once), the
refusals' latency, the CPU seconds the router and the workers spent, and the load average; then the
ratios burst / baseline of the served latencies.

In a cluster the router and the clients run on other machines than the workers. Here, by default
(`--pin`, on a machine of two CPUs or more), the router and this client share CPU 0 and the workers get
the others (each with as many torch threads as they have CPUs), so that the work of reading and refusing
the excess does not take CPU from the decoding workers, as it would not in a cluster. `--no-pin` shares
every CPU among them all.

    python bench/overload.py [--model DIR] [--burst 120] [--max-tokens 400] [--rounds 2] [--no-pin]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import statistics
import sys
import tempfile
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test support package: clusters and the burst itself

from support.overload import BATCH, burst, overload_manifest  # noqa: E402
from support.serving import start_cluster, wait_quiet  # noqa: E402

from phasesplit.tiny_model import make_tiny_model  # noqa: E402

MAX_QUEUE_WAIT = 5.0
TICKS = os.sysconf("SC_CLK_TCK")


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1] if len(values) > 1 else values[0]


def cpu_seconds(pid: int) -> float:
    """User and system time of a process, its threads included."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def cpu_by_process(cluster) -> dict[str, float]:
    return {proc.name: cpu_seconds(proc.pid) for proc in cluster.processes()}


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of a process onto `cpus` (threads it starts later inherit that)."""
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)


def pin_apart(cluster, front: set[int], back: set[int]) -> None:
    """The router and this process on `front`, the workers on `back`."""
    for proc in cluster.processes():
        pin(proc.pid, front if proc.name == "router" else back)
    pin(os.getpid(), front)


@dataclass
class Run:
    served: list[float]   # end to end, seconds
    decode: list[float]   # first token to last, seconds


def run(name: str, cluster, n: int, max_tokens: int) -> Run:
    before = cpu_by_process(cluster)
    outcomes = asyncio.run(burst(cluster.base_url, n, max_tokens))
    after = cpu_by_process(cluster)
    served = [o.seconds for o in outcomes if o.status == 200]
    decode = [o.seconds - o.first_token for o in outcomes if o.status == 200]
    first_wave = sorted(o.first_token for o in outcomes if o.status == 200)[:BATCH]   # admitted at once
    refused = [o.seconds for o in outcomes if o.status == 429]
    other = [o.status for o in outcomes if o.status not in (200, 429)]
    router = after.pop("router") - before.pop("router")
    workers = sum(after[name] - before[name] for name in after)
    line = (f"{name:>8}: {n} sent, {len(served)} served (P50 {quantile(served, 0.5):.2f} s, P90 "
            f"{quantile(served, 0.9):.2f} s; decode P50 {quantile(decode, 0.5):.2f} s; first token of the first "
            f"{BATCH} P50 {quantile(first_wave, 0.5):.2f} s), {len(refused)} refused")
    if refused:
        line += f" (P50 {quantile(refused, 0.5):.2f} s, max {max(refused):.2f} s)"
    line += f"; CPU s: router {router:.1f}, workers {workers:.1f}; load {os.getloadavg()[0]:.1f}"
    print(line + (f", other answers: {other}" if other else ""), flush=True)
    return Run(served, decode)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model directory (default: the tiny preset, written to a temporary directory)")
    p.add_argument("--burst", type=int, default=120, help="streams sent at once in the burst run")
    p.add_argument("--max-tokens", type=int, default=400, help="tokens each stream generates")
    p.add_argument("--rounds", type=int, default=2, help="burst and baseline pairs, in turn")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=len(os.sched_getaffinity(0)) > 1,
                   help="the router and the client on one CPU, the workers on the others (default: with 2+ CPUs)")
    args = p.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    front, back = {cpus[0]}, set(cpus[1:])
    if args.pin:
        os.environ["OMP_NUM_THREADS"] = str(len(back))   # the workers' torch threads: the CPUs they get
    print(f"router and client on CPU {cpus[0]}, workers on CPUs {sorted(back)}" if args.pin
          else f"router, client and workers share CPUs {cpus}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        model_dir = args.model or str(make_tiny_model(work / "model", seed=0, preset="tiny"))
        cluster = start_cluster(overload_manifest("overload", MAX_QUEUE_WAIT), model_dir, work / "logs")
        try:
            if args.pin:
                pin_apart(cluster, front, back)
            asyncio.run(burst(cluster.base_url, 2, 8))  # warm up both workers
            for _ in range(args.rounds):
                loaded = run("burst", cluster, args.burst, args.max_tokens)
                wait_quiet(cluster)
                alone = run("baseline", cluster, len(loaded.served), args.max_tokens)
                wait_quiet(cluster)
                print("  burst / baseline: " + ", ".join(
                    f"served P{int(q * 100)} {quantile(loaded.served, q) / quantile(alone.served, q):.2f}"
                    for q in (0.5, 0.9)) + f", decode P50 "
                    f"{quantile(loaded.decode, 0.5) / quantile(alone.decode, 0.5):.2f}", flush=True)
        finally:
            cluster.stop(15)


if __name__ == "__main__":
    main()
