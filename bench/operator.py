"""Operator benchmark against the kmock Kubernetes emulator (no cluster needed).

    .venv/bin/python bench/operator.py [--count 100]

The builtin autoscaler is switched off (autoscaling.mode none): this measures reconciliation.
Prints: time from applying one SplitInference to all its children existing (median of 5), the
time to reconcile COUNT of them applied at once (all children plus a written status), the
operator's peak RSS, CPU seconds spent by the operator and by the emulator (which shares this
process: when it is the busier one, the times measure kmock more than the operator), and the
ratio of the batch time to COUNT sequential single applies.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test support package: the emulator and the operator harness

from phasesplit.operator.kube import path  # noqa: E402
from support.examples import split_inference  # noqa: E402
from support.kube_emulator import EmulatorThread  # noqa: E402
from support.operator_harness import kube_client, start_operator, stop_operator  # noqa: E402
from support.polling import wait_for  # noqa: E402

CHILDREN = 11  # 2 ConfigMaps, 3 Services, 3 Deployments, 2 PodDisruptionBudgets, NetworkPolicy


def peak_rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_keys(name: str) -> set[tuple[str, str]]:
    """ConfigMaps are named by a hash of their content: they count by the prefix before it."""
    return {("configmaps", f"{name}-prompt-engine"), ("configmaps", f"{name}-token-engine"),
            ("services", f"{name}-prompt"), ("services", f"{name}-token"), ("services", name),
            ("deployments", f"{name}-prompt"), ("deployments", f"{name}-token"), ("deployments", f"{name}-router"),
            ("poddisruptionbudgets", f"{name}-prompt"), ("poddisruptionbudgets", f"{name}-token"),
            ("networkpolicies", f"{name}-workers")}


def _key(plural: str, name: str) -> tuple[str, str]:
    return (plural, name.rsplit("-", 1)[0]) if plural == "configmaps" else (plural, name)


def count_children(emulator, names: set[str]) -> int:
    """Cheap (keys only): the poller shares the emulator's process and must not slow it down."""
    wanted = set().union(*(child_keys(n) for n in names))
    return len(wanted & {_key(res.plural, name) for res, _, name in list(emulator.emulator.objects.keys())})


def manifest(name: str) -> dict:
    # Reconciliation only: the builtin autoscaler would scrape routers that do not exist here.
    return split_inference(name, "default", spec={"autoscaling": {"mode": "none"}})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, EmulatorThread(history=100) as emulator:
        kube = kube_client(emulator.url)
        proc = start_operator(emulator.kubeconfig(pathlib.Path(tmp) / "kubeconfig"), pathlib.Path(tmp) / "op.log")
        try:
            time.sleep(3)  # let kopf start its watches
            singles = []
            for i in range(5):
                name = f"single-{i}"
                start = time.perf_counter()
                kube.create(manifest(name))
                wait_for(lambda: count_children(emulator, {name}) == CHILDREN, timeout=60, interval=0.01)
                singles.append(time.perf_counter() - start)
            single = statistics.median(singles)
            names = {f"many-{i}" for i in range(args.count)}
            start = time.perf_counter()
            for name in sorted(names):
                kube.create(manifest(name))
            wait_for(lambda: count_children(emulator, names) == CHILDREN * args.count, timeout=1800, interval=1.0)
            children_s = time.perf_counter() - start

            def statuses_written():
                return all((kube.get(path("phasesplit.io/v1alpha1", "SplitInference", "default", n)) or {})
                           .get("status", {}).get("pools") for n in names)
            wait_for(statuses_written, timeout=1800, interval=2.0)
            total_s = time.perf_counter() - start
            rss = peak_rss_mib(proc.pid)
            operator_cpu, emulator_cpu = cpu_seconds(proc.pid), cpu_seconds(os.getpid())
        finally:
            stop_operator(proc)
    print(f"one SplitInference -> {CHILDREN} children: median {single * 1000:.0f} ms "
          f"(runs: {', '.join(f'{s * 1000:.0f}' for s in singles)} ms)")
    print(f"{args.count} SplitInferences applied at once: all {CHILDREN * args.count} children in {children_s:.1f} s, "
          f"reconciled with status in {total_s:.1f} s ({total_s / args.count * 1000:.0f} ms each)")
    print(f"operator peak RSS: {rss:.0f} MiB; CPU seconds: operator {operator_cpu:.1f}, "
          f"emulator and this client {emulator_cpu:.1f}")
    print(f"ratio batch / ({args.count} x single apply): {total_s / (args.count * single):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
