"""What each rank of a 2-rank gloo group runs in the tensor-parallel tests (spawned processes import
this module, which stays free of transformers)."""

import torch

from phasesplit.engine.engine import EngineConfig, LLMEngine, SamplingParams
from phasesplit.engine.loader import load_model
from phasesplit.engine.model import dense_causal_attention


def logits_and_greedy(tp, device, checkpoints, input_ids, engine_dir, prompts, max_tokens, results) -> int:
    """Rank 0 puts ("logits", name, tensor) for every checkpoint, then ("tokens", [[ids], ...])."""
    for name, path in checkpoints.items():
        _, model = load_model(path, "float32", device, tp)
        with torch.no_grad():
            logits = model.compute_logits(model(input_ids, torch.arange(len(input_ids)), dense_causal_attention()))
        if tp.is_leader:
            results.put(("logits", name, logits.tolist()))  # plain data: the queue outlives this process
    engine = LLMEngine(EngineConfig(str(engine_dir), block_size=4, max_num_batched_tokens=8), tp)
    if not tp.is_leader:
        engine.follow()
        return 0
    results.put(("tokens", greedy(engine, prompts, max_tokens)))
    engine.close()
    return 0


def greedy(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, rounds: int = 2) -> list[list[int]]:
    """Every prompt at once (in chunks of the budget beside the decodes), greedy, `max_tokens` each;
    `rounds` times over (a later round finds its prompts in the prefix cache)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    tokens = []
    for r in range(rounds):
        out = {f"{r}.{i}": [] for i in range(len(prompts))}
        for rid, ids in zip(out, prompts):
            engine.add_request(rid, ids, params)
        while engine.has_unfinished():
            for step in engine.step():
                out[step.request_id] += step.token_ids
        tokens += out.values()
    return tokens
