"""Chunked prefill on a mixed worker: the running streams' time between tokens (TBT) and long prompts'
time to first token (TTFT), chunked against whole-prompt prefill, measured in the same run.

Two in-process engines (a `small` preset checkpoint, about 100M parameters), one with chunked
prefill (--budget tokens per step) and one without, each decode --streams streams. --prompts
prompts of 2,000 to 4,000 tokens then arrive one at a time, each at both engines in turn (which
goes first alternates), so that both meet the same load on a shared machine. For each prompt
and engine: its TTFT, and the gaps between the streams' tokens from its arrival until every
stream has a token after its first (whole-prompt prefill stalls every stream for the prompt's
whole prefill; chunked prefill computes at most --budget tokens per step beside the decodes).
Targets: TBT P99 at most 0.5x of unchunked, TTFT P50 at most 1.3x.

    python bench/chunked.py [--model DIR] [--streams 16] [--prompts 4] [--budget 512] [--threads N]
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


def mixed_worker(model_dir: str, args, chunked: bool) -> LLMEngine:
    """An engine whose --streams streams are all decoding."""
    engine = LLMEngine(EngineConfig(model_dir, block_size=16, num_kv_blocks=args.kv_blocks,
                                    max_num_seqs=args.streams + 1, max_num_batched_tokens=args.budget,
                                    chunked_prefill=chunked))
    rng = random.Random(args.seed)
    vocab = engine.model_config.vocab_size
    engine.add_request("warm-up", [rng.randrange(4, vocab) for _ in range(600)], SamplingParams(max_tokens=1))
    stream = SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True)
    for i in range(args.streams):
        engine.add_request(f"s{i}", [rng.randrange(4, vocab) for _ in range(STREAM_PROMPT)], stream)
    decoding: set[str] = set()
    while len(decoding) < args.streams:
        decoding |= {out.request_id for out in engine.step() if out.request_id.startswith("s")}
    return engine


def one_prompt(engine: LLMEngine, rid: str, prompt: list[int]) -> tuple[float, list[float]]:
    """The prompt's TTFT and the streams' gaps between tokens while it is served."""
    last = {out.request_id: time.perf_counter() for out in engine.step()}  # a token from every stream
    arrived = time.perf_counter()
    engine.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=1))
    ttft, gaps = None, []
    while ttft is None or min(last.values()) < arrived + ttft:
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.request_id == rid:
                ttft = now - arrived
            else:
                gaps.append(now - last[out.request_id])
                last[out.request_id] = now
    return ttft, gaps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory (default: a fresh `small` preset)")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--budget", type=int, default=512, help="max_num_batched_tokens (tokens per step) when chunked")
    p.add_argument("--kv-blocks", type=int, default=1000, help="of 16 tokens, per engine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's; on a machine shared with other "
                                              "work, 1 avoids waiting on descheduled threads at every operation)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model or str(make_tiny_model(tempfile.mkdtemp(prefix="phasesplit-bench-"), preset="small"))

    engines = {chunked: mixed_worker(model_dir, args, chunked) for chunked in (False, True)}
    rng = random.Random(args.seed + 1)
    vocab = engines[False].model_config.vocab_size
    ttft = {False: [], True: []}
    tbt = {False: [], True: []}
    for i in range(args.prompts):
        prompt = [rng.randrange(4, vocab) for _ in range(rng.randint(2000, 4000))]
        for chunked in ((False, True) if i % 2 == 0 else (True, False)):
            t, gaps = one_prompt(engines[chunked], f"p{i}", prompt)
            ttft[chunked].append(t)
            tbt[chunked] += gaps
            print(f"  prompt {i} ({len(prompt)} tokens), {'chunked' if chunked else 'whole'}: TTFT {t:.2f} s, "
                  f"longest stream gap {max(gaps):.2f} s", flush=True)

    print(f"{args.streams} streams decoding, {args.prompts} prompts of 2000-4000 tokens, chunk budget {args.budget} "
          f"tokens per step, float32 on cpu ({torch.get_num_threads()} threads)")
    figures = {}
    for chunked in (False, True):
        gaps, firsts = np.array(tbt[chunked]), np.array(ttft[chunked])
        figures[chunked] = (np.percentile(gaps, 50), np.percentile(gaps, 99), np.percentile(firsts, 50))
        print(f"  {'chunked' if chunked else 'whole prompts':14} TBT P50 {figures[chunked][0]:6.3f} s  "
              f"P99 {figures[chunked][1]:6.3f} s   TTFT P50 {figures[chunked][2]:6.2f} s  ({len(gaps)} gaps)")
    tbt_ratio = figures[True][1] / figures[False][1]
    ttft_ratio = figures[True][2] / figures[False][2]
    print(f"  TBT P99 chunked/whole {tbt_ratio:.2f}x (target <= {TBT_TARGET}x: "
          f"{'met' if tbt_ratio <= TBT_TARGET else 'missed'}); TTFT P50 chunked/whole {ttft_ratio:.2f}x "
          f"(target <= {TTFT_TARGET}x: {'met' if ttft_ratio <= TTFT_TARGET else 'missed'})")


if __name__ == "__main__":
    main()
