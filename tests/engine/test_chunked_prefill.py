"""Chunked prefill is exact: a prompt computed in chunks over its cached blocks gives the logits of
transformers (fp32), and the engine's greedy and seeded output does not depend on the chunk size."""

import pytest
import torch

from phasesplit.engine.engine import EngineConfig, LLMEngine, SamplingParams
from phasesplit.engine.kv_cache import KVCache, KVLayout
from phasesplit.engine.loader import load_model
from phasesplit.engine.runner import ForwardBatch, ModelRunner

transformers = pytest.importorskip("transformers")
from support.checkpoints import BASE, CASES, write_checkpoint  # noqa: E402

BLOCK_SIZE = 4
LENGTH = 50


def chunked_last_logits(model, config, input_ids: torch.Tensor, chunk: int) -> dict[int, torch.Tensor]:
    """The prompt in chunks of `chunk` tokens through the model runner, its blocks scattered over the
    cache (not consecutive ids); the logits of each chunk's last token, by position."""
    num_blocks = 2 * -(-len(input_ids) // BLOCK_SIZE) + 1
    block_table = list(range(num_blocks - 1, 0, -2))  # descending, every other block
    layout = KVLayout("m", "float32", config.num_layers, config.num_kv_heads, config.head_dim, BLOCK_SIZE)
    runner = ModelRunner(model, KVCache(layout, num_blocks, torch.float32, "cpu"), BLOCK_SIZE, torch.device("cpu"))
    logits = {}
    for start in range(0, len(input_ids), chunk):
        end = min(len(input_ids), start + chunk)
        positions = torch.arange(start, end)
        slots = torch.tensor(block_table)[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
        batch = ForwardBatch(["s"], input_ids[start:end], positions, slots, [0, end - start], [end], [block_table], [])
        logits[end - 1] = runner.forward(batch)[0]
    return logits


@pytest.mark.parametrize("layout", ["rope_parameters", "classic"])
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_and_whole_prefill_match_transformers(tmp_path, case, layout):
    hf_cls = write_checkpoint(tmp_path, case, layout)
    hf = hf_cls.from_pretrained(tmp_path, dtype=torch.float32).eval()
    config, model = load_model(tmp_path, dtype="float32")
    input_ids = torch.randint(0, BASE["vocab_size"], (LENGTH,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids[None]).logits[0].float()
    # whole; one token at a time (a decode); a block; mid-block ends; more than half
    for chunk in (LENGTH, 1, BLOCK_SIZE, 3, 7, 30):
        got = chunked_last_logits(model, config, input_ids, chunk)
        assert len(got) == -(-LENGTH // chunk)
        for position, logits in got.items():
            assert (logits - expected[position]).abs().max().item() <= 1e-4, (chunk, position)


def outputs(model_dir, requests, arrivals, preemptions: list | None = None, **config) -> dict[str, list[int]]:
    engine = LLMEngine(EngineConfig(str(model_dir), block_size=BLOCK_SIZE, **config))
    tokens = {rid: [] for rid in requests}
    step = 0
    while step <= max(arrivals.values()) or engine.has_unfinished():
        for rid, (ids, params) in requests.items():
            if arrivals[rid] == step:
                engine.add_request(rid, ids, params)
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
        step += 1
    assert engine.num_used_blocks == 0
    if preemptions is not None:
        preemptions.append(engine.stats().num_preemptions)
    return tokens


@pytest.fixture(scope="module")
def mixed_requests():
    """Greedy and seeded requests, some arriving while others decode."""
    gen = torch.Generator().manual_seed(7)
    requests, arrivals = {}, {}
    for i, n in enumerate((45, 3, 22, 60, 1, 17, 33, 9)):
        ids = torch.randint(4, 500, (n,), generator=gen).tolist()
        params = (SamplingParams(temperature=0, max_tokens=12, ignore_eos=True) if i % 2 else
                  SamplingParams(temperature=0.9, top_p=0.9, seed=100 + i, max_tokens=12, ignore_eos=True))
        requests[f"r{i}"], arrivals[f"r{i}"] = (ids, params), 3 * i
    return requests, arrivals


@pytest.mark.parametrize("budget", [BLOCK_SIZE, 5, 7, 16, 33])  # one block; chunks ending mid-block
def test_output_does_not_depend_on_the_chunk_size(tiny_model_dir, mixed_requests, budget):
    requests, arrivals = mixed_requests
    whole = outputs(tiny_model_dir, requests, arrivals, chunked_prefill=False)
    chunked = outputs(tiny_model_dir, requests, arrivals, chunked_prefill=True, max_num_batched_tokens=budget,
                      max_num_seqs=4)
    assert chunked == whole
    assert all(len(tokens) == 12 for tokens in chunked.values())


def test_preempted_chunked_sequences_recompute_the_same_output(tiny_model_dir, mixed_requests):
    requests, arrivals = mixed_requests
    whole = outputs(tiny_model_dir, requests, arrivals, chunked_prefill=False)
    engine_config = dict(chunked_prefill=True, max_num_batched_tokens=8, num_kv_blocks=20, max_model_len=80)
    preemptions = []
    assert outputs(tiny_model_dir, requests, arrivals, preemptions, **engine_config) == whole
    assert preemptions[0] > 0


def test_a_long_prompt_runs_in_budget_sized_steps_beside_the_decodes(tiny_model_dir):
    engine = LLMEngine(EngineConfig(str(tiny_model_dir), block_size=BLOCK_SIZE, max_num_batched_tokens=10))
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    engine.add_request("a", [5, 6, 7], greedy)
    engine.add_request("b", [8, 9], greedy)
    assert {out.request_id for out in engine.step()} == {"a", "b"}
    engine.add_request("long", list(range(10, 40)), greedy)  # 30 tokens: 8 per step beside the 2 decodes
    steps = []
    while not steps or "long" not in steps[-1][0]:
        outs = sorted(out.request_id for out in engine.step())
        steps.append((outs, [seq.num_scheduled_tokens for seq in engine.scheduler.running]))
    # the decodes went on at every step, the prompt took what the budget left: 8, 8, 8, then its last 6
    assert steps == [(["a", "b"], [1, 1, 8])] * 3 + [(["a", "b", "long"], [1, 1, 6])]
