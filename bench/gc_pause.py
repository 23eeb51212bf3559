"""The pause of a full garbage collection in a worker process, as loaded and after the freeze the
worker does once its engine is loaded (`roles.server.freeze_loaded_objects`), in one run.

A worker holds some 300,000 long-lived objects (torch, tokenizers, gRPC, the model's modules) that
every full collection walks while it holds the GIL: the engine thread, and every running request's
next token, waits. Full collections are rare once a worker serves steadily (none ran on their own
in 256 requests of 128 tokens on the tiny model), so this measures the pause one costs when it
does run, forced with `gc.collect()`: the median of 5, before and after.

    python bench/gc_pause.py [--model DIR]

Without --model the tiny checkpoint is written to a temporary directory.
"""

import argparse
import gc
import statistics
import sys
import tempfile
import time

from phasesplit.roles.server import freeze_loaded_objects, load_engine, parse_args
from phasesplit.tiny_model import make_tiny_model


def full_collection_ms() -> float:
    times = []
    for _ in range(5):
        start = time.perf_counter()
        gc.collect()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model directory (default: a tiny random checkpoint)")
    args = p.parse_args(argv)
    model = args.model or make_tiny_model(tempfile.mkdtemp(prefix="phasesplit-gc-"))
    load_engine(parse_args(["--role", "mixed", "--model", str(model)]))
    tracked = len(gc.get_objects())
    loaded = full_collection_ms()
    freeze_loaded_objects()
    frozen = full_collection_ms()
    print(f"objects the collector tracks after loading: {tracked:,}")
    print(f"one full collection: {loaded:.1f} ms as loaded, {frozen * 1000:.1f} us frozen "
          f"({loaded / frozen:,.0f}x shorter)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
