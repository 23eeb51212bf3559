"""Toy profile tables and catalogs for the fleet tests."""

import csv

from phasesplit.fleet.perf import PROFILE_COLUMNS

CATALOG = """\
toy-gpu: {gpus: 1, gpu_memory_gib: 1, cost_per_hour: 2.0, power_w: 300, link_gbps_per_gpu: 0.08}
toy-big: {gpus: 2, gpu_memory_gib: 1, cost_per_hour: 5.0, power_w: 700, link_gbps_per_gpu: 0.08}
"""


def write_profile(path, rows):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, PROFILE_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in PROFILE_COLUMNS})
    return path


def toy_rows(hardware="toy-gpu", prompt_ms_per_token=1.0, token_ms=10.0, kv_tokens=100_000, tp=1):
    """Prompt time proportional to tokens, token time growing by 1 ms per sequence."""
    rows = []
    for prompt_size, batch in ((10, 1), (100, 1), (1000, 1), (1000, 4)):
        for b in (1, 8):
            rows.append({"model": "toy", "hardware": hardware, "tensor_parallel": tp, "prompt_size": prompt_size,
                         "batch_size": batch if b == 1 else b, "prompt_time": prompt_size * (batch if b == 1 else b)
                         * prompt_ms_per_token, "token_time": token_ms + (batch if b == 1 else b) - 1,
                         "kv_bytes_per_token": 1000, "kv_capacity_tokens": kv_tokens, "num_layers": 4})
    return rows
