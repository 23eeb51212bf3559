"""Operator benchmark against the kmock Kubernetes emulator (no cluster needed).

    .venv/bin/python bench/operator.py [--count 100]

Prints: time from applying one SplitInference to all its children existing (median of 5), the
time to reconcile COUNT of them applied at once (all children plus a written status), the
operator's peak RSS, and the ratio of the batch time to COUNT sequential single applies.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phasesplit.operator import crd  # noqa: E402
from phasesplit.operator.kube import path  # noqa: E402
from tests.tools.kube_emulator import EmulatorThread  # noqa: E402
from tests.tools.operator_harness import kube_client, start_operator, stop_operator, wait_for  # noqa: E402

CHILDREN = 8  # ConfigMap, 3 Services, 3 Deployments, NetworkPolicy


def peak_rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def count_children(emulator, names: set[str]) -> int:
    return sum(1 for (res, _, _), obj in list(emulator.emulator.objects.items())
               if res.plural in ("configmaps", "services", "deployments", "networkpolicies") and not obj.deleted
               and obj.raw.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/instance") in names)


def manifest(name: str) -> dict:
    doc = yaml.safe_load((ROOT / "manifests" / "examples" / "tiny-cpu.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": "default"}
    return doc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, EmulatorThread([crd.build_crd()]) as emulator:
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
            wait_for(lambda: count_children(emulator, names) == CHILDREN * args.count, timeout=600, interval=0.2)
            children_s = time.perf_counter() - start

            def statuses_written():
                return all((kube.get(path("phasesplit.io/v1alpha1", "SplitInference", "default", n)) or {})
                           .get("status", {}).get("pools") for n in names)
            wait_for(statuses_written, timeout=600, interval=0.5)
            total_s = time.perf_counter() - start
            rss = peak_rss_mib(proc.pid)
        finally:
            stop_operator(proc)
    print(f"one SplitInference -> {CHILDREN} children: median {single * 1000:.0f} ms "
          f"(runs: {', '.join(f'{s * 1000:.0f}' for s in singles)} ms)")
    print(f"{args.count} SplitInferences applied at once: all {CHILDREN * args.count} children in {children_s:.1f} s, "
          f"reconciled with status in {total_s:.1f} s ({total_s / args.count * 1000:.0f} ms each)")
    print(f"operator peak RSS: {rss:.0f} MiB")
    print(f"ratio batch / ({args.count} x single apply): {total_s / (args.count * single):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
