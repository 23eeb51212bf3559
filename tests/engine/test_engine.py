import random

import pytest
import torch

from phasesplit.engine.engine import EngineConfig, KVCapacityError, LLMEngine, SamplingParams

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b",
    "Kubernetes schedules pods onto nodes",
    "Once upon a time, in a land far away, there lived a",
    "1, 2, 3, 4, 5,",
    "The KV cache holds keys and values for every layer",
    "import torch",
    "Splitwise runs the prompt phase and the token phase on different machines so that",
    "a",
]
GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture
def make_engine(tiny_model_dir):
    def make(**overrides) -> LLMEngine:
        return LLMEngine(EngineConfig(str(tiny_model_dir), **overrides))
    return make


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]],
        arrivals: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Step until done; request `rid` is added before step `arrivals[rid]` (default 0)."""
    arrivals = arrivals or {}
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    step = 0
    while step <= max(arrivals.values(), default=0) or engine.has_unfinished():
        for rid, (ids, params) in requests.items():
            if arrivals.get(rid, 0) == step:
                engine.add_request(rid, ids, params)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
        step += 1
    return tokens


def run_alone(engine: LLMEngine, requests) -> dict[str, list[int]]:
    return {rid: run(engine, {rid: req})[rid] for rid, req in requests.items()}


def random_requests(n: int, seed: int, vocab: int, sampled: bool = False) -> dict:
    rng = random.Random(seed)
    requests = {}
    for i in range(n):
        ids = [rng.randrange(4, vocab) for _ in range(rng.randint(3, 70))]
        params = SamplingParams(max_tokens=rng.randint(4, 30), **GREEDY)
        if sampled and i % 2:
            params = SamplingParams(temperature=1.0, top_p=0.9, seed=i, max_tokens=params.max_tokens, ignore_eos=True)
        requests[f"r{i}"] = (ids, params)
    return requests


def test_greedy_matches_transformers_generate(make_engine, tiny_model_dir):
    from transformers import LlamaForCausalLM

    engine = make_engine()
    requests = {f"p{i}": (engine.tokenizer.encode(p), SamplingParams(max_tokens=32, **GREEDY))
                for i, p in enumerate(PROMPTS)}
    got = run(engine, requests)
    reference = LlamaForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    for rid, (ids, _) in requests.items():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
        assert got[rid] == out[0, len(ids):].tolist(), rid


def test_continuous_batching_gives_the_same_tokens_as_running_alone(make_engine):
    engine = make_engine(max_num_batched_tokens=128, max_num_seqs=8)
    requests = random_requests(16, seed=1, vocab=engine.model_config.vocab_size)
    arrivals = {rid: 3 * i // 2 for i, rid in enumerate(requests)}
    batched = run(engine, requests, arrivals)
    assert batched == run_alone(make_engine(), requests)
    assert all(len(batched[rid]) == params.max_tokens for rid, (_, params) in requests.items())


def test_preemption_when_blocks_are_scarce_keeps_the_tokens(make_engine):
    engine = make_engine(num_kv_blocks=12, block_size=8, max_model_len=96)
    requests = random_requests(10, seed=2, vocab=engine.model_config.vocab_size, sampled=True)
    scarce = run(engine, requests)
    assert engine.stats().num_preemptions > 0
    assert engine.num_used_blocks == 0
    assert scarce == run_alone(make_engine(), requests)


def test_seeded_sampling_repeats_and_differs_by_seed(make_engine):
    engine = make_engine()
    ids = engine.tokenizer.encode(PROMPTS[1])
    params = dict(temperature=1.0, max_tokens=16, ignore_eos=True)
    first = run(engine, {"a": (ids, SamplingParams(seed=7, **params)), "b": (ids, SamplingParams(seed=8, **params))})
    again = run(engine, {"a": (ids, SamplingParams(seed=7, **params))})
    assert first["a"] == again["a"]
    assert first["a"] != first["b"]


def handoff(prompt_engine: LLMEngine, token_engine: LLMEngine, requests) -> dict[str, list[int]]:
    """Prefill on one engine, copy the KV blocks into the other's cache, decode there."""
    hook_calls = []
    prompt_engine.layer_hook = lambda layer, rids: hook_calls.append((layer, sorted(rids)))
    for rid, (ids, params) in requests.items():
        prompt_engine.add_request(rid, ids, params, prefill_only=True)
    firsts = {}
    while prompt_engine.has_unfinished():
        for out in prompt_engine.step():
            assert out.finished and out.finish_reason is None
            firsts[out.request_id] = out.token_ids
    assert [layer for layer, _ in hook_calls] == list(range(prompt_engine.model_config.num_layers))
    assert hook_calls[0][1] == sorted(requests)

    tokens = {}
    for rid, (ids, params) in requests.items():
        export = prompt_engine.handoff(rid)
        assert export.prompt_token_ids == ids and [export.first_token] == firsts[rid]
        dst = token_engine.reserve_kv(rid, len(ids))
        src, dst = torch.tensor(prompt_engine.blocks_of(rid)), torch.tensor(dst)
        for layer in range(token_engine.model_config.num_layers):
            for theirs, mine in zip(prompt_engine.kv_layer(layer), token_engine.kv_layer(layer)):
                mine[dst] = theirs[src]
        assert prompt_engine.release(rid)
        token_engine.add_prefilled(export, params)
        tokens[rid] = [export.first_token]
    assert prompt_engine.num_used_blocks == 0
    while token_engine.has_unfinished():
        for out in token_engine.step():
            tokens[out.request_id] += out.token_ids
    return tokens


def test_split_handoff_decodes_the_same_tokens(make_engine):
    full = make_engine()
    requests = {
        "greedy": (full.tokenizer.encode(PROMPTS[4]), SamplingParams(max_tokens=20, **GREEDY)),
        "long": (full.tokenizer.encode(PROMPTS[8] * 3), SamplingParams(max_tokens=12, **GREEDY)),
        "seeded": (full.tokenizer.encode(PROMPTS[2]), SamplingParams(temperature=0.9, seed=3, max_tokens=16,
                                                                      ignore_eos=True)),
    }
    expected = run(full, requests)
    token_engine = make_engine(num_kv_blocks=64, max_num_seqs=2)  # one request waits for a decode slot
    token_engine.reserve_kv("occupant", 40)  # so block ids differ between the two caches
    assert handoff(make_engine(), token_engine, requests) == expected
    assert token_engine.release("occupant") and token_engine.num_used_blocks == 0


def test_a_token_engine_refuses_kv_it_cannot_hold(make_engine):
    engine = make_engine(num_kv_blocks=4, block_size=16, max_model_len=64)
    engine.reserve_kv("a", 40)  # 3 blocks
    with pytest.raises(KVCapacityError, match="need 2 KV blocks, 1 free of 4"):
        engine.reserve_kv("b", 20)
    assert engine.abort("a") and engine.num_used_blocks == 0


@pytest.mark.parametrize("chunked", [False, True])
def test_no_blocks_leak_after_aborts_mid_prefill_and_mid_decode(make_engine, chunked):
    engine = make_engine(max_num_batched_tokens=64 if not chunked else 24, chunked_prefill=chunked)
    requests = random_requests(8, seed=3, vocab=engine.model_config.vocab_size)
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    engine.layer_hook = lambda layer, rids: "r0" in rids and engine.abort("r0")  # inside its prefill
    outputs = []
    for _ in range(4):
        outputs += engine.step()
    engine.layer_hook = None
    decoding = [seq.request_id for seq in engine.scheduler.running]
    waiting = [seq.request_id for seq in engine.scheduler.waiting]
    assert decoding and waiting, "the scenario needs requests both decoding and waiting"
    aborted = {"r0", decoding[0], waiting[-1]}
    assert engine.abort(decoding[0]) and engine.abort(waiting[-1]) and not engine.abort("r0")
    while engine.has_unfinished():
        outputs += engine.step()
    assert engine.num_used_blocks == 0
    finished = {out.request_id for out in outputs if out.finished}
    assert finished == set(requests) - aborted
    assert all(out.request_id != "r0" for out in outputs)
    stats = engine.stats()
    assert (stats.used_blocks, stats.running_requests, stats.waiting_requests) == (0, 0, 0)


def test_blocks_return_after_every_request_finishes(make_engine):
    engine = make_engine()
    run(engine, random_requests(6, seed=4, vocab=engine.model_config.vocab_size))
    assert engine.num_used_blocks == 0 and engine.num_free_blocks == engine.num_total_blocks


@pytest.mark.parametrize(("make_params", "field"), [
    (lambda: SamplingParams(max_tokens=0), "max_tokens"),
    (lambda: SamplingParams(temperature=-1), "temperature"),
    (lambda: SamplingParams(top_p=0), "top_p"),
    (lambda: SamplingParams(top_p=1.01), "top_p"),
    (lambda: SamplingParams(top_k=-2), "top_k"),
])
def test_bad_sampling_params_name_the_field(make_params, field):
    with pytest.raises(ValueError, match=field):
        make_params()


def test_bad_requests_are_refused_and_the_others_carry_on(make_engine):
    engine = make_engine(max_model_len=64)
    good = {"good": (engine.tokenizer.encode(PROMPTS[1]), SamplingParams(max_tokens=10, **GREEDY))}
    engine.add_request("good", *good["good"])
    engine.step()
    with pytest.raises(ValueError, match="prompt: 64 tokens is too long: max_model_len is 64"):
        engine.add_request("long", [5] * 64, SamplingParams())
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("oov", [engine.model_config.vocab_size], SamplingParams())
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("good", [5], SamplingParams())
    tokens = run(engine, {})
    assert [engine.requests, engine.num_used_blocks] == [{}, 0]
    rest = run(make_engine(max_model_len=64), good)["good"]
    assert rest[1:] == tokens["good"] and len(rest) == 10


def test_stop_string_ends_the_text_before_it(make_engine):
    engine = make_engine()
    ids = engine.tokenizer.encode(PROMPTS[6])
    text = "".join(o.text for o in drive(engine, "a", ids, SamplingParams(max_tokens=24, **GREEDY)))
    stop = text[len(text) // 2: len(text) // 2 + 3]
    outs = drive(engine, "b", ids, SamplingParams(max_tokens=24, stop=[stop], **GREEDY))
    assert outs[-1].finish_reason == "stop"
    assert "".join(o.text for o in outs) == text[: text.index(stop)]


def drive(engine, rid, ids, params):
    engine.add_request(rid, ids, params)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    return outs
