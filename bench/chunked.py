"""Chunked prefill on a mixed worker: the running streams' time between tokens (TBT) and long prompts'
time to first token (TTFT), chunked against whole-prompt prefill, measured in the same run.

An in-process engine (a `small` preset checkpoint, about 100M parameters) decodes --streams
streams; meanwhile --prompts prompts of 2,000 to 4,000 tokens arrive, one every --gap seconds
(the same arrivals and prompts for both runs). Whole-prompt prefill stalls every stream for a
prompt's whole prefill; chunked prefill computes at most --budget tokens per step beside the decodes.
Targets: TBT P99 at most 0.5x of unchunked, TTFT P50 at most 1.3x.

    python bench/chunked.py [--model DIR] [--streams 16] [--prompts 4] [--gap 15] [--budget 512]
"""

import argparse
import random
import tempfile
import time

import numpy as np
import torch

from phasesplit.engine.engine import EngineConfig, LLMEngine, SamplingParams
from phasesplit.tiny_model import make_tiny_model

STREAM_PROMPT = 32
TBT_TARGET, TTFT_TARGET = 0.5, 1.3


def arrivals(args, vocab: int) -> list[tuple[float, list[int]]]:
    rng = random.Random(args.seed)
    return [(i * args.gap, [rng.randrange(4, vocab) for _ in range(rng.randint(2000, 4000))])
            for i in range(args.prompts)]


def run(model_dir: str, args, chunked: bool) -> dict[str, list[float]]:
    """Seconds between the streams' tokens (`tbt`) and from each prompt's arrival to its first token (`ttft`)."""
    engine = LLMEngine(EngineConfig(model_dir, block_size=16, num_kv_blocks=args.kv_blocks,
                                    max_num_seqs=args.streams + args.prompts, max_num_batched_tokens=args.budget,
                                    chunked_prefill=chunked))
    vocab = engine.model_config.vocab_size
    rng = random.Random(args.seed + 1)
    stream = SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True)
    engine.add_request("warm-up", [rng.randrange(4, vocab) for _ in range(600)], SamplingParams(max_tokens=1))
    for i in range(args.streams):
        engine.add_request(f"s{i}", [rng.randrange(4, vocab) for _ in range(STREAM_PROMPT)], stream)
    last: dict[str, float] = {}  # each stream's latest token
    while len(last) < args.streams:  # every stream decoding before the prompts arrive
        for out in engine.step():
            if out.request_id.startswith("s"):
                last[out.request_id] = time.perf_counter()

    pending = arrivals(args, vocab)
    arrived, ttft, tbt, end = {}, [], [], None
    start = time.perf_counter()
    # until every prompt has its first token and every stream one more after that (a stall counts whole)
    while end is None or any(t < end for t in last.values()):
        now = time.perf_counter()
        while pending and pending[0][0] <= now - start:
            rid = f"p{len(arrived)}"
            engine.add_request(rid, pending.pop(0)[1], SamplingParams(temperature=0, max_tokens=1))
            arrived[rid] = now
        outputs = engine.step()
        t = time.perf_counter()
        for out in outputs:
            if out.request_id in arrived:
                ttft.append(t - arrived[out.request_id])
            elif out.request_id.startswith("s"):
                tbt.append(t - last[out.request_id])
                last[out.request_id] = t
        if end is None and len(ttft) == args.prompts:
            end = t
    return {"tbt": tbt, "ttft": ttft}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory (default: a fresh `small` preset)")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--gap", type=float, default=15.0, help="seconds between the prompts' arrivals")
    p.add_argument("--budget", type=int, default=512, help="max_num_batched_tokens (tokens per step)")
    p.add_argument("--kv-blocks", type=int, default=2000, help="of 16 tokens")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    model_dir = args.model or str(make_tiny_model(tempfile.mkdtemp(prefix="phasesplit-bench-"), preset="small"))

    results = {chunked: run(model_dir, args, chunked) for chunked in (False, True)}
    print(f"{args.streams} streams decoding, {args.prompts} prompts of 2000-4000 tokens every {args.gap:g} s, "
          f"budget {args.budget} tokens per step, float32 on cpu ({torch.get_num_threads()} threads)")
    figures = {}
    for chunked, r in results.items():
        tbt, ttft = np.array(r["tbt"]), np.array(r["ttft"])
        figures[chunked] = (np.percentile(tbt, 50), np.percentile(tbt, 99), np.percentile(ttft, 50))
        print(f"  {'chunked' if chunked else 'whole prompts':14} TBT P50 {figures[chunked][0]:6.3f} s  "
              f"P99 {figures[chunked][1]:6.3f} s   TTFT P50 {figures[chunked][2]:6.2f} s  max {ttft.max():6.2f} s  "
              f"({len(tbt)} gaps)")
    (_, tbt99_whole, ttft_whole), (_, tbt99_chunked, ttft_chunked) = figures[False], figures[True]
    tbt_ratio, ttft_ratio = tbt99_chunked / tbt99_whole, ttft_chunked / ttft_whole
    print(f"  TBT P99 chunked/whole {tbt_ratio:.2f}x (target <= {TBT_TARGET}x: "
          f"{'met' if tbt_ratio <= TBT_TARGET else 'missed'}); TTFT P50 chunked/whole {ttft_ratio:.2f}x "
          f"(target <= {TTFT_TARGET}x: {'met' if ttft_ratio <= TTFT_TARGET else 'missed'})")


if __name__ == "__main__":
    main()
