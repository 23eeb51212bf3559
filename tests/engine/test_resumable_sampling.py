"""A request resumed at any position (its prompt plus the tokens already produced, as a migration
re-runs it) continues with exactly the tokens of an uninterrupted run: greedy and seeded."""

import pytest

from phasesplit.engine.engine import EngineConfig, LLMEngine, SamplingParams

PROMPT = list(range(30, 70))


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(EngineConfig(str(tiny_model_dir), num_kv_blocks=128, max_model_len=256))


def run(engine, rid: str, ids: list[int], params: SamplingParams, others: int = 0) -> list[int]:
    """Token ids of `rid`, batched with `others` unrelated sampled requests."""
    engine.add_request(rid, ids, params)
    for i in range(others):
        engine.add_request(f"{rid}-other-{i}", ids[i:], SamplingParams(temperature=1.0, max_tokens=40))
    out = []
    while engine.has_unfinished():
        out += [t for step in engine.step() if step.request_id == rid for t in step.token_ids]
    return out


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
                                    SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=40,
                                                   ignore_eos=True)], ids=["greedy", "seeded"])
@pytest.mark.parametrize("cut", [1, 17, 39])
def test_resuming_at_any_position_continues_the_uninterrupted_run(engine, params, cut):
    whole = run(engine, f"whole-{cut}", PROMPT, params)
    assert len(whole) == 40
    rest = SamplingParams(temperature=params.temperature, top_p=params.top_p, seed=params.seed,
                          max_tokens=40 - cut, ignore_eos=True)
    resumed = run(engine, f"resumed-{cut}", PROMPT + whole[:cut], rest, others=3)
    assert whole[:cut] + resumed == whole


def test_seeded_runs_differ_by_seed_and_are_really_sampled(engine):
    a = run(engine, "a", PROMPT, SamplingParams(temperature=1.0, seed=1, max_tokens=30, ignore_eos=True))
    b = run(engine, "b", PROMPT, SamplingParams(temperature=1.0, seed=2, max_tokens=30, ignore_eos=True))
    greedy = run(engine, "g", PROMPT, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    assert a != b and a != greedy and b != greedy
