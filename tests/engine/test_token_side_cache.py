"""The token side of prefix caching: the handoff carries the prompt's block hashes as both engines key them,
and a token worker keeps a finished request's full blocks (prompt and generated) cached under those hashes,
which its Load poll then reports to the router; a later turn's transfer shares them instead of moving them."""

import pytest
import torch

from phasesplit.engine.block_manager import CachedPrefixGone
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


def _prefill(engine, rid, ids, params):
    engine.add_request(rid, ids, params, prefill_only=True)
    while engine.has_unfinished():
        engine.step()
    return engine.handoff(rid)


def _receive(prompt_engine, token_engine, handoff, params, held: int = 0) -> list[int]:
    """Moves the prompt's blocks from position `held` on (the token engine shares its cached ones before), then
    decodes there: the output tokens."""
    rid, ids = handoff.request_id, handoff.prompt_token_ids
    reserved = token_engine.reserve_kv(rid, len(ids), handoff.block_hashes[:held])
    dst, src = torch.tensor(reserved[held:]), torch.tensor(prompt_engine.blocks_of(rid)[held:])
    for layer in range(token_engine.model_config.num_layers):
        for theirs, mine in zip(prompt_engine.kv_layer(layer), token_engine.kv_layer(layer)):
            mine[dst] = theirs[src]
    prompt_engine.release(rid)
    token_engine.add_prefilled(handoff, params)
    output = [handoff.first_token]
    while token_engine.has_unfinished():
        for out in token_engine.step():
            output += out.token_ids
    return output


def test_a_second_turn_shares_the_token_workers_cached_blocks_and_decodes_as_if_all_had_moved(tiny_model_dir):
    prompt_engine, token_engine, fresh_engine = (LLMEngine(EngineConfig(str(tiny_model_dir), block_size=BLOCK))
                                                 for _ in range(3))
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=12, cache_salt="tenant")
    turn1 = list(range(5, 55))
    answer = _receive(prompt_engine, token_engine, _prefill(prompt_engine, "t1", turn1, params), params)
    turn2 = turn1 + answer + list(range(300, 340))
    handoff = _prefill(prompt_engine, "t2", turn2, params)
    held = 3   # turn 1's full prompt blocks, which the token engine kept
    cached_ids = [token_engine.block_manager.block_of_hash[h] for h in handoff.block_hashes[:held]]

    reserved = token_engine.reserve_kv("probe", len(turn2), handoff.block_hashes[:held])
    assert reserved[:held] == cached_ids and not set(reserved[held:]) & set(cached_ids)
    token_engine.release("probe")

    shared = _receive(prompt_engine, token_engine, handoff, params, held)
    moved = _receive(prompt_engine, fresh_engine, _prefill(prompt_engine, "t2b", turn2, params), params)
    assert shared == moved
    assert token_engine.num_used_blocks == 0 and prompt_engine.num_used_blocks == 0
    assert all(token_engine.block_manager.block_of_hash[h] == b for h, b in zip(handoff.block_hashes, cached_ids))


def test_reserving_blocks_the_cache_no_longer_holds_is_refused_and_takes_nothing(tiny_model_dir):
    engine = LLMEngine(EngineConfig(str(tiny_model_dir), block_size=BLOCK))
    gone = block_hashes(list(range(5, 55)), BLOCK, "never seen")
    with pytest.raises(CachedPrefixGone, match="2 of the 2 leading blocks are no longer cached"):
        engine.reserve_kv("r", 50, gone[:2])
    assert engine.num_used_blocks == 0 and not engine.is_reserved("r")
