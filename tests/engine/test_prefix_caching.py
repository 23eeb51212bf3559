"""Prefix caching: a request whose prompt starts with blocks an earlier one computed reuses their KV and
computes only the rest, with the same output as without the cache; salts keep requests apart; the
cache gives blocks back under memory pressure and leaks none."""

import random

import pytest

from phasesplit.engine.block_manager import BlockManager
from phasesplit.engine.engine import EngineConfig, LLMEngine, SamplingParams
from phasesplit.engine.sequence import Sequence

BLOCK = 16
GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture
def make_engine(tiny_model_dir):
    def make(**overrides) -> LLMEngine:
        return LLMEngine(EngineConfig(str(tiny_model_dir), block_size=BLOCK, **overrides))
    return make


def run(engine: LLMEngine, requests: dict, arrivals: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Step until done; request `rid` is added before step `arrivals[rid]` (default 0)."""
    arrivals = arrivals or {}
    out: dict[str, list[int]] = {rid: [] for rid in requests}
    step = 0
    while step <= max(arrivals.values(), default=0) or engine.has_unfinished():
        for rid, (ids, params) in requests.items():
            if arrivals.get(rid, 0) == step:
                engine.add_request(rid, ids, params)
        for step_output in engine.step():
            out[step_output.request_id] += step_output.token_ids
        step += 1
    return out


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 500) for _ in range(n)]


def conversation_requests(seed: int, sampled: bool = False) -> dict:
    """Requests that share prefixes: three preambles, each continued by several tails (some whole
    blocks long), some also repeating another request's whole prompt."""
    rng = random.Random(seed)
    preambles = [tokens(n, seed * 10 + i) for i, n in enumerate((40, 64, 17))]
    requests = {}
    for i in range(12):
        ids = preambles[i % 3] + tokens(rng.choice((0, 5, 16, 23)), seed * 100 + i)
        params = SamplingParams(max_tokens=rng.randint(4, 20), **GREEDY)
        if sampled and i % 2:
            params = SamplingParams(temperature=1.0, top_p=0.9, seed=i, max_tokens=params.max_tokens, ignore_eos=True)
        requests[f"r{i}"] = (ids, params)
    return requests


def computed_tokens(engine: LLMEngine) -> list[tuple[int, int]]:
    """Records (first position, token count) of every step the engine's runner computes."""
    steps = []
    forward = engine.runner.forward

    def recording(batch):
        steps.append((int(batch.positions[0]), len(batch.input_ids)))
        return forward(batch)
    engine.runner.forward = recording
    return steps


def assert_no_leak(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert not engine.has_unfinished()
    assert (bm.num_free_blocks, int(bm.ref_count.sum()), bm.is_free.all()) == (bm.num_blocks, 0, True)
    assert len(bm.evictable) == bm.num_cached_blocks == int(bm.is_cached.sum())


@pytest.mark.parametrize("chunked", [False, True])
def test_output_is_the_same_with_and_without_the_cache(make_engine, chunked):
    requests = conversation_requests(seed=1, sampled=True)
    arrivals = {rid: 4 * i for i, rid in enumerate(requests)}
    config = dict(chunked_prefill=chunked, max_num_batched_tokens=48)
    cached = make_engine(**config)
    with_cache = run(cached, requests, arrivals)
    assert with_cache == run(make_engine(prefix_caching=False, **config), requests, arrivals)
    stats = cached.stats()
    assert 0 < stats.prefix_cache_hits < stats.prefix_cache_queries
    assert_no_leak(cached)


def test_preempted_sequences_with_shared_prefixes_keep_their_output(make_engine):
    requests = conversation_requests(seed=2, sampled=True)
    scarce = make_engine(num_kv_blocks=14, max_model_len=128, max_num_batched_tokens=32)
    got = run(scarce, requests)
    assert scarce.stats().num_preemptions > 0 and scarce.stats().prefix_cache_hits > 0
    assert got == run(make_engine(prefix_caching=False), requests)
    assert_no_leak(scarce)


def test_a_second_request_computes_only_the_tail_after_the_shared_blocks(make_engine):
    engine = make_engine()
    steps = computed_tokens(engine)
    preamble, params = tokens(40, 0), SamplingParams(max_tokens=3, **GREEDY)
    outputs = {}

    def serve(rid, ids):
        engine.add_request(rid, ids, params)
        while engine.has_unfinished():
            for out in engine.step():
                outputs.setdefault(rid, []).append(out)
        return outputs[rid][0].num_cached_tokens

    assert serve("first", preamble) == 0
    engine.add_request("queued", preamble[:36] + tokens(9, 2), params)
    assert engine.stats().waiting_tokens == 13  # what the queue will compute, not what the cache holds
    assert engine.abort("queued")
    steps.clear()
    assert serve("second", preamble[:36] + tokens(9, 1)) == 32  # two full blocks shared, 13 tokens computed
    assert steps[0] == (32, 13)
    stats = engine.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (40 + 45, 32)
    assert all(out.num_cached_tokens == 32 for out in outputs["second"])


@pytest.mark.parametrize(("length", "cached"), [(48, 32), (49, 48)])
def test_a_prompt_cached_whole_still_computes_its_last_token(make_engine, length, cached):
    engine = make_engine()
    ids, params = tokens(length, 2), SamplingParams(max_tokens=4, **GREEDY)
    first = run(engine, {"a": (ids, params)})["a"]
    steps = computed_tokens(engine)
    engine.add_request("b", ids, params)
    out = engine.step()[0]
    assert (out.num_cached_tokens, steps[0]) == (cached, (cached, length - cached))
    assert out.token_ids == first[:1]


def test_a_block_is_shared_only_once_its_kv_is_written(make_engine):
    """A finished request's last token was sampled but never computed: the block it fills is not cached."""
    engine = make_engine()
    prompt = tokens(40, 4)
    output = run(engine, {"a": (prompt, SamplingParams(max_tokens=8, **GREEDY))})["a"]  # 48 tokens, 47 computed
    follow_up = {"b": (prompt + output + tokens(2, 5), SamplingParams(max_tokens=6, **GREEDY))}
    steps = computed_tokens(engine)
    assert run(engine, follow_up) == run(make_engine(prefix_caching=False), follow_up)
    assert steps[0] == (32, 18)


def test_a_prompt_aborted_midway_leaves_only_the_blocks_it_computed(make_engine):
    engine = make_engine(max_num_batched_tokens=BLOCK)
    prompt, params = tokens(80, 6), SamplingParams(max_tokens=5, **GREEDY)
    engine.add_request("aborted", prompt, params)
    engine.step()  # its first chunk: one block
    assert engine.abort("aborted")
    steps = computed_tokens(engine)
    again = {"again": (prompt, params)}
    assert run(engine, again) == run(make_engine(prefix_caching=False), again)
    assert steps[0] == (BLOCK, BLOCK)


def test_a_salted_request_never_uses_another_salts_blocks(make_engine):
    engine = make_engine()
    ids = tokens(50, 3)

    def cached_tokens(rid, salt):
        engine.add_request(rid, ids, SamplingParams(max_tokens=2, cache_salt=salt, **GREEDY))
        firsts = [out for _ in range(3) for out in engine.step() if out.request_id == rid]
        return firsts[0].num_cached_tokens

    assert cached_tokens("a", "tenant-a") == 0
    assert cached_tokens("b", "tenant-b") == 0
    assert cached_tokens("unsalted", None) == 0
    assert cached_tokens("a-again", "tenant-a") == 48
    assert cached_tokens("b-again", "tenant-b") == 48


@pytest.mark.parametrize("salt", ["", "x" * 1025, 7])
def test_a_bad_cache_salt_is_refused_by_name(salt):
    with pytest.raises(ValueError, match="cache_salt"):
        SamplingParams(cache_salt=salt)


def test_memory_pressure_evicts_cached_blocks_and_the_output_stays_right(make_engine):
    engine = make_engine(num_kv_blocks=10, max_model_len=128)
    requests = {f"r{i}": (tokens(60, 10 + i % 4), SamplingParams(max_tokens=5, **GREEDY)) for i in range(8)}
    got = {rid: run(engine, {rid: req})[rid] for rid, req in requests.items()}  # one after the other
    assert got == run(make_engine(prefix_caching=False), requests)
    # Without the pressure each of the 4 prompts that come back would find 48 tokens cached.
    assert 0 <= engine.stats().prefix_cache_hits < 4 * 48
    assert_no_leak(engine)


def seq_of(rid: str, ids: list[int]) -> Sequence:
    return Sequence(rid, ids, SamplingParams())


def computed(bm: BlockManager, seq: Sequence) -> None:
    seq.num_cached_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)


def test_a_finished_requests_last_blocks_are_evicted_first():
    bm = BlockManager(8, 4, prefix_caching=True)
    first = seq_of("a", list(range(17)))  # 4 full blocks and one token
    bm.allocate(first)
    computed(bm, first)
    blocks = list(first.block_table)
    bm.deallocate(first)
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 4
    bm.take(6)  # the 4 fresh blocks, then the 2 cached ones freed first: the request's last two
    again = seq_of("b", list(range(17)))
    assert bm.cached_prefix(again) == blocks[:2]


def test_fresh_blocks_are_taken_before_cached_ones_and_a_hit_grows_after_its_prefix():
    bm = BlockManager(16, 4, prefix_caching=True)
    a = seq_of("a", list(range(8)))
    bm.allocate(a)
    computed(bm, a)
    a_blocks = list(a.block_table)
    bm.deallocate(a)
    other = seq_of("other", list(range(100, 120)))  # 5 blocks: all fresh, the cached two stay
    bm.allocate(other)
    assert not set(other.block_table) & set(a_blocks) and bm.num_cached_blocks == 2
    b = seq_of("b", list(range(8)) + [50] * 5)
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table[:2] == a_blocks and b.num_cached_tokens == 8
    assert b.block_table[2:] == [a_blocks[1] + 1, a_blocks[1] + 2]  # its fresh blocks follow its cached ones


def test_a_waiting_prompts_cached_prefix_is_counted_again_as_the_cache_grows_and_evicts():
    """What the queue's token count reads after every step: remembered between calls, never stale."""
    bm = BlockManager(8, 4, prefix_caching=True)
    waiting = seq_of("waiting", list(range(17)))
    assert bm.num_cached_prefix_tokens(waiting) == 0
    first = seq_of("first", list(range(8)))   # computes the waiting prompt's first 2 blocks
    bm.allocate(first)
    computed(bm, first)
    bm.deallocate(first)
    assert bm.num_cached_prefix_tokens(waiting) == 8
    longer = seq_of("longer", list(range(17)))   # and then all 4 it may find cached
    bm.allocate(longer)
    computed(bm, longer)
    bm.deallocate(longer)
    assert bm.num_cached_prefix_tokens(waiting) == 16
    bm.take(8)   # evicts every cached block
    assert bm.num_cached_prefix_tokens(waiting) == 0 == len(bm.cached_prefix(waiting))
