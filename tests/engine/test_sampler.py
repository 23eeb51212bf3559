import math

import pytest
import torch

from phasesplit.engine.sampler import SamplingParams, sample


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"seed": "7"}, "seed"),
    ({"stop": ("",)}, "stop"),
])
def test_bad_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        SamplingParams(**kwargs)


def test_stop_accepts_a_single_string():
    assert SamplingParams(stop="\n").stop == ("\n",)


def probs_logits(probs: list[float], rows: int = 1) -> torch.Tensor:
    return torch.tensor([probs] * rows).log()


def test_greedy_is_argmax():
    logits = torch.randn(5, 50)
    params = [SamplingParams(temperature=0)] * 5
    assert sample(logits, params, [0] * 5) == logits.argmax(-1).tolist()


def test_top_k_one_is_argmax_even_when_hot():
    logits = torch.randn(4, 50)
    params = [SamplingParams(temperature=5.0, top_k=1)] * 4
    assert sample(logits, params, [0] * 4) == logits.argmax(-1).tolist()


def test_temperature_sampling_follows_the_distribution():
    probs = [0.5, 0.3, 0.15, 0.05]
    n = 4000
    tokens = sample(probs_logits(probs, n), [SamplingParams(temperature=1.0)] * n, [0] * n)
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / n
    assert torch.allclose(freq, torch.tensor(probs), atol=0.03), freq


def test_top_k_and_top_p_cut_the_tail():
    probs = [0.5, 0.3, 0.15, 0.05]
    n = 2000
    top_k = sample(probs_logits(probs, n), [SamplingParams(top_k=2)] * n, [0] * n)
    top_p = sample(probs_logits(probs, n), [SamplingParams(top_p=0.7)] * n, [0] * n)
    assert set(top_k) == {0, 1}
    assert set(top_p) == {0, 1}


def test_rows_keep_their_own_settings_in_one_batch():
    probs = [0.5, 0.3, 0.15, 0.05]
    params = [SamplingParams(temperature=0), SamplingParams(top_k=3), SamplingParams(top_p=0.4)] * 300
    tokens = sample(probs_logits(probs, len(params)), params, [0] * len(params))
    assert set(tokens[0::3]) == {0}
    assert set(tokens[1::3]) == {0, 1, 2}
    assert set(tokens[2::3]) == {0}


def test_seed_gives_the_same_tokens_alone_or_batched():
    logits = torch.randn(1, 100)
    params = SamplingParams(temperature=1.0, seed=1234)

    def run(batch: int) -> list[int]:
        others = [SamplingParams(temperature=1.0)] * (batch - 1)
        out = []
        for position in range(20):
            rows = torch.cat([logits, torch.randn(batch - 1, 100)])
            out.append(sample(rows, [params, *others], [position] + [7] * (batch - 1))[0])
        return out

    alone, batched = run(1), run(8)
    assert alone == batched
    assert len(set(alone)) > 1  # really sampled, not argmax
