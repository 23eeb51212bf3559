"""Engine throughput against transformers' static-batch `generate`, measured in the same run.

Workload: N requests (prompts of 16 to 512 tokens, outputs of 8 to 128) arriving at once, greedy,
EOS ignored so both sides produce exactly the requested tokens. The engine batches continuously
(at most --batch-size sequences at a time); transformers runs static batches of --batch-size in
arrival order, left-padded, each generating until its longest request is done. Throughput counts
only the tokens the requests asked for.

    python bench/engine.py [--model DIR] [--requests 64] [--batch-size 16] [--device cpu]

Without --model a `small` preset checkpoint (about 100M parameters) is written to a temporary dir.
"""

import argparse
import random
import tempfile
import time

import torch

from phasesplit.engine.engine import EngineConfig, LLMEngine, SamplingParams
from phasesplit.tiny_model import make_tiny_model


def workload(n: int, seed: int, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(4, vocab) for _ in range(rng.randint(16, 512))], rng.randint(8, 128)) for _ in range(n)]


def run_engine(engine: LLMEngine, requests) -> tuple[int, float]:
    start = time.perf_counter()
    for i, (ids, max_tokens) in enumerate(requests):
        engine.add_request(str(i), ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    generated = 0
    while engine.has_unfinished():
        generated += sum(len(out.token_ids) for out in engine.step())
    _sync(engine.device)
    return generated, time.perf_counter() - start


@torch.inference_mode()
def run_transformers(model, requests, batch_size: int, device: torch.device) -> tuple[int, float]:
    start = time.perf_counter()
    generated = 0
    for b in range(0, len(requests), batch_size):
        batch = requests[b:b + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([[0] * (width - len(ids)) + ids for ids, _ in batch], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in batch], device=device)
        new = max(max_tokens for _, max_tokens in batch)
        model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0)
        generated += sum(max_tokens for _, max_tokens in batch)
    _sync(device)
    return generated, time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory (default: a fresh `small` preset)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="engine max_num_seqs and transformers batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    model_dir = args.model or str(make_tiny_model(tempfile.mkdtemp(prefix="phasesplit-bench-"), preset="small"))
    device = torch.device(args.device)

    engine = LLMEngine(EngineConfig(model_dir, dtype=args.dtype, device=args.device, max_num_seqs=args.batch_size))
    requests = workload(args.requests, args.seed, engine.model_config.vocab_size)
    run_engine(engine, requests[:2])  # warm-up
    engine_tokens, engine_s = run_engine(engine, requests)
    del engine

    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    run_transformers(model, requests[:2], args.batch_size, device)  # warm-up
    hf_tokens, hf_s = run_transformers(model, requests, args.batch_size, device)

    prompt_tokens = sum(len(ids) for ids, _ in requests)
    print(f"workload: {len(requests)} requests, {prompt_tokens} prompt tokens, {engine_tokens} output tokens, "
          f"batch size {args.batch_size}, {args.dtype} on {args.device} ({torch.get_num_threads()} threads)")
    print(f"phasesplit engine:         {engine_tokens / engine_s:8.1f} output tokens/s ({engine_s:.1f} s)")
    print(f"transformers generate:     {hf_tokens / hf_s:8.1f} output tokens/s ({hf_s:.1f} s)")
    print(f"ratio (engine / transformers): {(engine_tokens / engine_s) / (hf_tokens / hf_s):.2f}x")


if __name__ == "__main__":
    main()
