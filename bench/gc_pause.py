"""The pause of a full garbage collection in a worker and in a router process, as loaded and after
the freeze each does once it has loaded (`phasesplit.heap.freeze_loaded_objects`), in one run.

A full collection walks every tracked object while it holds the GIL: in a worker the engine thread
waits, and with it every running request's next token; in the router every stream's events wait.
Full collections are rare once a process serves steadily (none ran on their own in 256 requests
of 128 tokens to a worker on the tiny model), so this measures the pause one costs when it does
run, forced with `gc.collect()`: the median of 5, before and after. Each process kind is loaded in
its own interpreter, as it runs.

    python bench/gc_pause.py [--model DIR]

Without --model the tiny checkpoint is written to a temporary directory.
"""

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time

from phasesplit.heap import freeze_loaded_objects


def full_collection_ms() -> float:
    times = []
    for _ in range(5):
        start = time.perf_counter()
        gc.collect()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def load(kind: str, model: str) -> None:
    if kind == "worker":
        from phasesplit.roles.server import load_engine, parse_args
        load_engine(parse_args(["--role", "mixed", "--model", model]))
    else:
        from phasesplit.router import main as router
        from phasesplit.router.tokenizer_source import TokenizerSource
        args = router.build_parser().parse_args(["--model", model, "--pools", "mixed", "--mixed-workers", "127.0.0.1:1"])
        router.create_app(router.settings_from_args(args), TokenizerSource.from_dir(model))


def measure(kind: str, model: str) -> dict:
    load(kind, model)
    tracked = len(gc.get_objects())
    loaded = full_collection_ms()
    freeze_loaded_objects()
    return {"tracked": tracked, "loaded_ms": loaded, "frozen_ms": full_collection_ms()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model directory (default: a tiny random checkpoint)")
    p.add_argument("--measure", choices=["worker", "router"], help=argparse.SUPPRESS)  # one child's part
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.model)))
        return 0
    if args.model is None:
        from phasesplit.tiny_model import make_tiny_model
        args.model = str(make_tiny_model(tempfile.mkdtemp(prefix="phasesplit-gc-")))
    for kind in ("worker", "router"):
        out = subprocess.run([sys.executable, __file__, "--measure", kind, "--model", args.model],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.splitlines()[-1])
        print(f"{kind}: {r['tracked']:,} tracked objects; one full collection {r['loaded_ms']:.1f} ms as loaded, "
              f"{r['frozen_ms'] * 1000:.1f} us frozen ({r['loaded_ms'] / r['frozen_ms']:,.0f}x shorter)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
