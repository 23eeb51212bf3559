"""Tensor parallelism on CPU with gloo: 2 ranks give the same logits (within 1e-4 of transformers) and
the same greedy tokens as one (also from the prefix cache); each rank holds only its shard; bad sizes are refused by name."""

import multiprocessing

import pytest
import torch
from support import tp_ranks

from phasesplit.engine.config import ModelConfig
from phasesplit.engine.engine import EngineConfig, LLMEngine
from phasesplit.engine.loader import load_model
from phasesplit.engine.parallel import Shard, TensorParallel, check_tensor_parallel
from phasesplit.engine.ranks import RankGroup

transformers = pytest.importorskip("transformers")
from support.checkpoints import BASE, write_checkpoint  # noqa: E402

# kv 2 of 4 heads; kv 1 (replicated on both ranks) with llama3 rope; Qwen2 q/k/v biases with tied embeddings.
PARITY_CASES = ("llama-gqa", "llama3-rope", "qwen2-bias-tied")
PROMPTS = [[5, 17, 300, 2, 9, 41, 77], [400, 3], list(range(30, 60)), [11] * 13]


def test_two_ranks_match_transformers_and_one_rank_token_for_token(tmp_path, tiny_model_dir):
    checkpoints, expected = {}, {}
    input_ids = torch.randint(0, BASE["vocab_size"], (40,), generator=torch.Generator().manual_seed(1))
    for case in PARITY_CASES:
        checkpoints[case] = tmp_path / case
        hf_cls = write_checkpoint(checkpoints[case], case, "classic")
        with torch.no_grad():
            expected[case] = hf_cls.from_pretrained(checkpoints[case], dtype=torch.float32)(input_ids[None]).logits[0]
    engine = LLMEngine(EngineConfig(str(tiny_model_dir), block_size=4, max_num_batched_tokens=8))
    one_rank = tp_ranks.greedy(engine, PROMPTS, 10)
    assert one_rank[len(PROMPTS):] == one_rank[:len(PROMPTS)] and engine.stats().prefix_cache_hits > 0

    results = multiprocessing.get_context("spawn").Queue()
    group = RankGroup(2, tp_ranks.logits_and_greedy,
                      (checkpoints, input_ids, tiny_model_dir, PROMPTS, 10, results)).start()
    got = [results.get(timeout=120) for _ in range(len(PARITY_CASES) + 1)]  # before wait: a full pipe blocks rank 0
    assert group.wait() == 0
    for kind, case, logits in got[:-1]:
        logits = torch.tensor(logits)
        assert logits.shape == expected[case].shape
        assert (logits - expected[case]).abs().max().item() <= 1e-4, case
    assert got[-1] == ("tokens", one_rank)
    assert all(len(tokens) == 10 for tokens in one_rank)


def test_each_rank_loads_only_its_shard(tiny_model_dir):
    _, whole = load_model(tiny_model_dir)
    shards = [load_model(tiny_model_dir, tp=TensorParallel(rank, 2))[1] for rank in range(2)]
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.0.mlp.up_proj.weight", "lm_head.weight"):
        parts = [dict(s.named_parameters())[name] for s in shards]
        assert torch.equal(torch.cat(parts, dim=0), dict(whole.named_parameters())[name])
    for name in ("model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        parts = [dict(s.named_parameters())[name] for s in shards]
        assert torch.equal(torch.cat(parts, dim=1), dict(whole.named_parameters())[name])
    embedding = whole.model.embed_tokens.weight.numel()
    sharded = sum(p.numel() for p in whole.parameters()) - embedding
    assert sum(p.numel() for p in shards[1].parameters()) - embedding < 0.51 * sharded


def test_fewer_kv_heads_than_ranks_replicates_them():
    config = ModelConfig("LlamaForCausalLM", 100, 64, 128, 1, num_heads=8, num_kv_heads=2, head_dim=8)
    shards = [Shard.of(config, TensorParallel(rank, 8)) for rank in range(8)]
    assert [list(s.kv_heads) for s in shards] == [[0]] * 4 + [[1]] * 4
    assert [list(s.heads) for s in shards] == [[r] for r in range(8)]
    assert [len(s.vocab) for s in shards] == [13] * 7 + [9] and shards[0].vocab_per_rank == 13


@pytest.mark.parametrize("size, field", [(5, "num_attention_heads"), (4, "num_key_value_heads"),
                                         (0, "integer >= 1")])
def test_a_size_the_model_cannot_split_is_refused_by_name(size, field):
    config = ModelConfig("LlamaForCausalLM", 100, 64, 96, 1, num_heads=12, num_kv_heads=6, head_dim=8)
    with pytest.raises(ValueError, match=field):
        check_tensor_parallel(config, size)
