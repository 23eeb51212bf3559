"""The token side of prefix caching: the handoff carries the prompt's block hashes as both engines key them,
and a token worker keeps a finished request's full blocks (prompt and generated) cached under those hashes,
which its Load poll then reports to the router."""

import torch

from phasesplit.engine.engine import EngineConfig, LLMEngine, SamplingParams
from phasesplit.prefix_hash import block_hashes

BLOCK = 16


def test_a_token_worker_keeps_a_finished_requests_blocks_cached_under_the_handoffs_hashes(tiny_model_dir):
    prompt_engine, token_engine = (LLMEngine(EngineConfig(str(tiny_model_dir), block_size=BLOCK)) for _ in range(2))
    ids = list(range(5, 55))  # 3 full blocks and 2 tokens
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=20, cache_salt="tenant")
    prompt_engine.add_request("r", ids, params, prefill_only=True)
    while prompt_engine.has_unfinished():
        prompt_engine.step()
    handoff = prompt_engine.handoff("r")
    assert handoff.block_hashes == block_hashes(ids, BLOCK, "tenant") and len(handoff.block_hashes) == 3
    assert handoff.to_proto().block_hashes == handoff.block_hashes

    dst, src = torch.tensor(token_engine.reserve_kv("r", len(ids))), torch.tensor(prompt_engine.blocks_of("r"))
    for layer in range(token_engine.model_config.num_layers):
        for theirs, mine in zip(prompt_engine.kv_layer(layer), token_engine.kv_layer(layer)):
            mine[dst] = theirs[src]
    token_engine.add_prefilled(handoff, params)
    output = [handoff.first_token]
    while token_engine.has_unfinished():
        for out in token_engine.step():
            output += out.token_ids
    assert len(output) == 20 and token_engine.num_used_blocks == 0

    computed = (ids + output)[:-1]   # the last token's KV is never written
    kept = block_hashes(computed, BLOCK, "tenant")
    assert len(kept) == 4 and set(kept) <= set(token_engine.block_manager.block_of_hash)
    assert set(kept) <= set(token_engine.block_manager.events.since("", 0).stored)
