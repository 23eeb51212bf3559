"""Engine throughput against transformers' static-batch `generate`, measured in the same run.

Workload: N requests (prompts of 16 to 512 tokens, outputs of 8 to 128) arriving at once, greedy,
EOS ignored so both sides produce exactly the requested tokens. The engine batches continuously
(at most --batch-size sequences at a time); transformers runs static batches of --batch-size in
arrival order, left-padded, each generating until its longest request is done. Throughput counts
only the tokens the requests asked for.

Long context (--case long-context): decode tokens/s of a batch of --long-batch sequences at
--long-context tokens each (their KV imported as a token worker does, so nothing is prefilled),
attending through the block table (the engine's path) against the decode path it replaced, which
copied every sequence's whole context out of the cache per layer (`gather_attention`, kept here
only as the baseline); once with each sequence's blocks consecutive, once with them scattered.

    python bench/engine.py [--model DIR] [--requests 64] [--batch-size 16] [--device cpu] [--case all]

Without --model a `small` preset checkpoint (about 100M parameters) is written to a temporary dir.
"""

import argparse
import random
import tempfile
import time

import torch
import torch.nn.functional as F

from phasesplit.engine import runner
from phasesplit.engine.engine import EngineConfig, KVHandoff, LLMEngine, SamplingParams
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


def gather_attention(q, k, v, k_cache, v_cache, spans):
    """The decode attention the engine had before it read the cache through block views: every
    sequence's context copied out of the cache (padded to the longest), then one masked SDPA."""
    assert all(s.num_new == 1 for s in spans), "the gather path only decodes"
    max_blocks = max(len(s.block_ids) for s in spans)
    tables = torch.tensor([list(s.block_ids) + [0] * (max_blocks - len(s.block_ids)) for s in spans],
                          device=q.device)
    b, (h, _, bs, d) = len(spans), k_cache.shape
    k_ctx = k_cache.index_select(1, tables.reshape(-1)).view(h, b, max_blocks * bs, d).transpose(0, 1)
    v_ctx = v_cache.index_select(1, tables.reshape(-1)).view(h, b, max_blocks * bs, d).transpose(0, 1)
    context_lens = torch.tensor([s.context_len for s in spans], device=q.device)
    mask = (torch.arange(max_blocks * bs, device=q.device)[None, :] < context_lens[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(q.unsqueeze(2), k_ctx, v_ctx, attn_mask=mask, enable_gqa=True).squeeze(2)


def scatter_blocks(block_manager) -> None:
    """Every block its own run from now on: blocks are taken in a shuffled order."""
    order = list(range(block_manager.num_blocks))
    random.Random(0).shuffle(order)

    def pick_fresh(n, after=None):
        return [b for b in order if block_manager.is_free[b] and not block_manager.is_cached[b]][:n]
    block_manager.pick_fresh = pick_fresh


def decode_at_context(model_dir: str, args, attention, scattered: bool) -> float:
    """Decode tokens/s of --long-batch sequences whose --long-context tokens of KV are in the cache."""
    blocks_per_seq = -(-(args.long_context + args.long_steps + 1) // 16)
    engine = LLMEngine(EngineConfig(model_dir, dtype=args.dtype, device=args.device, block_size=16,
                                    num_kv_blocks=args.long_batch * blocks_per_seq + 1,
                                    max_num_seqs=args.long_batch))
    for cache in (*engine.kv_cache.k, *engine.kv_cache.v):
        cache.normal_()
    if scattered:
        scatter_blocks(engine.block_manager)
    params = SamplingParams(temperature=0, max_tokens=args.long_steps + 2, ignore_eos=True)
    for i in range(args.long_batch):
        prompt = [random.Random(i).randrange(4, 1000) for _ in range(args.long_context)]
        engine.reserve_kv(str(i), len(prompt))
        engine.add_prefilled(KVHandoff(str(i), prompt, engine.layout, first_token=5), params)
    engine.step()  # warm-up
    saved, runner.paged_attention = runner.paged_attention, attention
    try:
        start = time.perf_counter()
        tokens = sum(len(out.token_ids) for _ in range(args.long_steps) for out in engine.step())
        _sync(engine.device)
        return tokens / (time.perf_counter() - start)
    finally:
        runner.paged_attention = saved


def long_context(model_dir: str, args) -> None:
    print(f"long context: {args.long_batch} sequences at {args.long_context} tokens, {args.long_steps} decode steps, "
          f"{args.dtype} on {args.device} ({torch.get_num_threads()} threads)")
    for scattered in (False, True):
        paged = decode_at_context(model_dir, args, runner.paged_attention, scattered)
        gather = decode_at_context(model_dir, args, gather_attention, scattered)
        blocks = "scattered blocks" if scattered else "consecutive blocks"
        print(f"  {blocks:18}  block views: {paged:7.1f} tokens/s   gather (before): {gather:7.1f} tokens/s   "
              f"ratio {paged / gather:.2f}x")


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
    p.add_argument("--case", choices=("all", "throughput", "long-context"), default="all")
    p.add_argument("--long-context", type=int, default=4000, help="tokens of context per sequence")
    p.add_argument("--long-batch", type=int, default=8)
    p.add_argument("--long-steps", type=int, default=8)
    args = p.parse_args()
    model_dir = args.model or str(make_tiny_model(tempfile.mkdtemp(prefix="phasesplit-bench-"), preset="small"))
    if args.case in ("all", "throughput"):
        throughput(model_dir, args)
    if args.case in ("all", "long-context"):
        long_context(model_dir, args)


def throughput(model_dir: str, args) -> None:
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
