"""Admission control under a burst: what the admitted requests pay for the excess that is refused.

Local mode, tiny model, 1 prompt + 1 token worker (a decode batch of 16), the router's
`maxQueueWaitSeconds: 5`. Two runs on the same cluster: the burst sends 120 streams at once, the
baseline then sends only as many as the burst got served (no excess). Prints, for each, how many were
served and refused (429), the served streams' end-to-end P50/P90 and the refusals' latency, and the
ratio of the served latencies (burst / baseline): what the refused excess costs the admitted.

    python bench/overload.py [--model DIR] [--burst 120] [--max-tokens 400]
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import statistics
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test support package: clusters and the burst itself

from support.overload import burst, overload_manifest  # noqa: E402
from support.serving import start_cluster, wait_quiet  # noqa: E402

from phasesplit.tiny_model import make_tiny_model  # noqa: E402

MAX_QUEUE_WAIT = 5.0


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1] if len(values) > 1 else values[0]


def report(name: str, outcomes) -> list[float]:
    served = [o.seconds for o in outcomes if o.status == 200]
    refused = [o.seconds for o in outcomes if o.status == 429]
    other = [o.status for o in outcomes if o.status not in (200, 429)]
    line = f"{name:>8}: {len(outcomes)} sent, {len(served)} served (P50 {quantile(served, 0.5):.2f} s, " \
           f"P90 {quantile(served, 0.9):.2f} s), {len(refused)} refused"
    if refused:
        line += f" (P50 {quantile(refused, 0.5):.2f} s, max {max(refused):.2f} s)"
    print(line + (f", other answers: {other}" if other else ""))
    return served


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model directory (default: the tiny preset, written to a temporary directory)")
    p.add_argument("--burst", type=int, default=120, help="streams sent at once in the burst run")
    p.add_argument("--max-tokens", type=int, default=400, help="tokens each stream generates")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        model_dir = args.model or str(make_tiny_model(work / "model", seed=0, preset="tiny"))
        cluster = start_cluster(overload_manifest("overload", MAX_QUEUE_WAIT), model_dir, work / "logs")
        try:
            asyncio.run(burst(cluster.base_url, 2, 8))  # warm up both workers
            loaded = report("burst", asyncio.run(burst(cluster.base_url, args.burst, args.max_tokens)))
            wait_quiet(cluster)
            baseline = report("baseline", asyncio.run(burst(cluster.base_url, len(loaded), args.max_tokens)))
        finally:
            cluster.stop(15)
    for q in (0.5, 0.9):
        print(f"served P{int(q * 100)} burst / baseline: {quantile(loaded, q) / quantile(baseline, q):.2f}")


if __name__ == "__main__":
    main()
