"""What a long-running process does once it has loaded what it keeps for life."""

import gc


def freeze_loaded_objects() -> None:
    """Keeps what loading left (a worker: torch, the model, gRPC, ~300,000 objects) out of every later
    collection: a full collection walks them all while holding the GIL, stalling the process
    (bench/gc_pause.py measures how long)."""
    gc.collect()
    gc.freeze()
