"""`phasesplit profile`: measure the engine's prompt and token iteration times on this machine.

Writes a profile table in the schema of the bundled one (`phasesplit.fleet.perf`), so `simulate`
and `plan` work for the user's own model and hardware. Each point runs a batch of `batch_size`
prompts of `prompt_size` tokens: the first engine step is the batch's prefill (`prompt_time`),
the next `--token-steps` are decode iterations of the whole batch (`token_time`, their mean).

With `--mixed-out`, also the steps chunked prefill runs: a prompt chunk of each prompt size beside
each batch size of decoding sequences, one step each (`step_time`), in a table of their own
(`MIXED_COLUMNS`), so that a chunked-prefill iteration can be priced.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

from phasesplit.cli_format import HelpFormatter
from phasesplit.fleet.perf import MIXED_COLUMNS, PROFILE_COLUMNS, load_catalog



def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="phasesplit profile", description=__doc__.splitlines()[0].split(": ", 1)[1],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR", help="Hugging Face model directory")
    p.add_argument("--name", help="model name in the table (default: the directory's name)")
    p.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--hardware", help="hardware name in the table (default: from the device)")
    p.add_argument("--prompt-sizes", default="16,64,256", help="comma-separated prompt lengths in tokens")
    p.add_argument("--batch-sizes", default="1,4,16", help="comma-separated batch sizes")
    p.add_argument("--token-steps", type=int, default=8, help="decode iterations timed per point")
    p.add_argument("--repeats", type=int, default=2, help="runs per point")
    p.add_argument("--out", required=True, metavar="CSV", help="where to write the profile table")
    p.add_argument("--mixed-out", metavar="CSV", help="also time mixed steps (a prompt chunk beside decodes) "
                                                      "into this table")
    return p.parse_args(argv)


def _sizes(text: str, flag: str) -> list[int]:
    try:
        sizes = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1:
        raise ValueError(f"{flag}: {text!r} is not a comma-separated list of integers >= 1")
    return sizes


def hardware_name(device: str) -> str:
    import torch
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        return name.lower().replace("nvidia ", "").replace(" ", "-")
    return "cpu"


def measure(engine, prompt_size: int, batch_size: int, token_steps: int) -> tuple[float, float, float]:
    """(prompt ms, token ms, end-to-end ms) of one batch."""
    from phasesplit.engine.engine import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=token_steps + 1, ignore_eos=True)
    vocab = engine.model_config.vocab_size
    for i in range(batch_size):
        engine.add_request(f"p{prompt_size}-b{batch_size}-{i}-{time.monotonic_ns()}",
                           [(7 + 31 * i + j) % vocab for j in range(prompt_size)], params)
    start = time.perf_counter()
    engine.step()
    prefilled = time.perf_counter()
    if engine.scheduler.waiting:
        raise RuntimeError(f"the batch of {batch_size} x {prompt_size} tokens did not fit one prefill")
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    end = time.perf_counter()
    return (prefilled - start) * 1e3, (end - prefilled) * 1e3 / max(steps, 1), (end - start) * 1e3


def measure_mixed(engine, chunk_tokens: int, num_decodes: int) -> float:
    """ms of one step computing a `chunk_tokens`-token prompt beside `num_decodes` decoding sequences."""
    from phasesplit.engine.engine import SamplingParams
    vocab = engine.model_config.vocab_size
    tag = time.monotonic_ns()
    decoding = [f"d{chunk_tokens}-{num_decodes}-{i}-{tag}" for i in range(num_decodes)]
    for i, rid in enumerate(decoding):
        engine.add_request(rid, [(11 + 17 * i + j) % vocab for j in range(8)],
                           SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    engine.step()  # their prefill: they decode from here on
    chunk = f"c{chunk_tokens}-{num_decodes}-{tag}"
    engine.add_request(chunk, [(5 + 13 * j) % vocab for j in range(chunk_tokens)],
                       SamplingParams(temperature=0, max_tokens=1))
    start = time.perf_counter()
    stepped = {out.request_id for out in engine.step()}
    elapsed = (time.perf_counter() - start) * 1e3
    if stepped != {chunk, *decoding}:
        raise RuntimeError(f"the {chunk_tokens}-token chunk and {num_decodes} decodes did not run as one step")
    while engine.has_unfinished():
        engine.step()
    return elapsed


def profile_mixed(engine, args: argparse.Namespace, name: str, hardware: str) -> list[dict]:
    rows = []
    for chunk_tokens in _sizes(args.prompt_sizes, "--prompt-sizes"):
        for num_decodes in _sizes(args.batch_sizes, "--batch-sizes"):
            for _ in range(args.repeats):
                rows.append({"model": name, "hardware": hardware, "chunk_tokens": chunk_tokens,
                             "num_decodes": num_decodes, "tensor_parallel": 1,
                             "step_time": round(measure_mixed(engine, chunk_tokens, num_decodes), 4)})
    return rows


def profile(args: argparse.Namespace) -> list[dict]:
    from phasesplit.engine.engine import EngineConfig, LLMEngine
    from phasesplit.engine.kv_cache import bytes_per_block
    prompts, batches = _sizes(args.prompt_sizes, "--prompt-sizes"), _sizes(args.batch_sizes, "--batch-sizes")
    if args.token_steps < 1 or args.repeats < 1:
        raise ValueError("--token-steps and --repeats: must be >= 1")
    longest = prompts[-1] + args.token_steps + 1
    # room for the largest batch, and for --mixed-out's chunk beside it
    engine = LLMEngine(EngineConfig(args.model, dtype=args.dtype, device=args.device, max_model_len=longest,
                                    max_num_seqs=batches[-1] + 1,
                                    max_num_batched_tokens=(prompts[-1] + 1) * batches[-1],
                                    num_kv_blocks=(batches[-1] + 1) * (-(-longest // 16)) + 1))
    name = args.name or os.path.basename(os.path.normpath(args.model))
    hardware = args.hardware or hardware_name(args.device)
    kv_bytes = bytes_per_block(engine.layout, engine.dtype) / engine.layout.block_size
    measure(engine, prompts[0], 1, 1)   # warm-up
    rows = []
    for prompt_size in prompts:
        for batch_size in batches:
            for _ in range(args.repeats):
                prompt_ms, token_ms, e2e_ms = measure(engine, prompt_size, batch_size, args.token_steps)
                rows.append({"model": name, "hardware": hardware, "prompt_size": prompt_size,
                             "batch_size": batch_size, "token_size": args.token_steps + 1, "peak_power": "",
                             "average_power": "", "prompt_time": round(prompt_ms, 4),
                             "token_time": round(token_ms, 4), "e2e_time": round(e2e_ms, 4), "tensor_parallel": 1,
                             "kv_bytes_per_token": kv_bytes, "num_layers": engine.layout.num_layers,
                             "kv_capacity_tokens": _capacity_tokens(args.device, kv_bytes, engine)})
    if args.mixed_out:
        write(profile_mixed(engine, args, name, hardware), args.mixed_out, MIXED_COLUMNS)
    return rows


def _capacity_tokens(device: str, kv_bytes: float, engine) -> int:
    """KV tokens one instance could hold in service: what is free on the GPU, or the engine's CPU pool."""
    import torch
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * 0.8 // kv_bytes)
    from phasesplit.engine.engine import CPU_KV_BYTES
    return int(CPU_KV_BYTES // kv_bytes)


def write(rows: list[dict], path: str | Path, columns: tuple[str, ...] = PROFILE_COLUMNS) -> None:
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rows = profile(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"phasesplit profile: error: {e}", file=sys.stderr)
        return 2
    write(rows, args.out)
    hardware = rows[0]["hardware"]
    print(f"wrote {len(rows)} rows for {rows[0]['model']} on {hardware} to {args.out}")
    if hardware not in load_catalog():
        print(f"{hardware} is not in the bundled catalog: give simulate/plan a --catalog file with an entry, e.g.\n"
              f"{hardware}: {{gpus: 1, gpu_memory_gib: 0, cost_per_hour: 1.0, power_w: 100, link_gbps_per_gpu: 10}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
