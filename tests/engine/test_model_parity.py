"""Logits of phasesplit's model against transformers on the same checkpoint directory (float32)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from phasesplit.engine.loader import load_model  # noqa: E402
from phasesplit.engine.model import dense_causal_attention  # noqa: E402
from support.checkpoints import BASE, CASES, write_checkpoint  # noqa: E402

@pytest.mark.parametrize("layout", ["rope_parameters", "classic"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case, layout):
    hf_cls = write_checkpoint(tmp_path, case, layout)
    hf = hf_cls.from_pretrained(tmp_path, dtype=torch.float32).eval()
    config, model = load_model(tmp_path, dtype="float32")
    assert config.architecture == hf_cls.__name__
    # 100 tokens: beyond llama3's original_max_position_embeddings (32), so the scaled band matters.
    input_ids = torch.randint(0, BASE["vocab_size"], (100,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids[None]).logits[0].float()
        hidden = model(input_ids, torch.arange(100), dense_causal_attention())
        logits = model.compute_logits(hidden)
    assert logits.dtype == torch.float32 and logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= 1e-4


def test_llama3_scaling_changes_the_model(tmp_path):
    """Guard for the test above: dropping the llama3 scaling must visibly change the logits."""
    write_checkpoint(tmp_path, "llama3-rope", "classic")
    input_ids = torch.randint(0, BASE["vocab_size"], (100,), generator=torch.Generator().manual_seed(1))
    _, scaled = load_model(tmp_path)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"rope_scaling": None}))
    _, plain = load_model(tmp_path)
    with torch.no_grad():
        a = scaled.compute_logits(scaled(input_ids, torch.arange(100), dense_causal_attention()))
        b = plain.compute_logits(plain(input_ids, torch.arange(100), dense_causal_attention()))
    assert (a - b).abs().max().item() > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tracks_float32(tmp_path, dtype):
    write_checkpoint(tmp_path, "llama-gqa", "rope_parameters")
    input_ids = torch.randint(0, BASE["vocab_size"], (48,), generator=torch.Generator().manual_seed(2))
    _, ref = load_model(tmp_path, dtype="float32")
    _, half = load_model(tmp_path, dtype=dtype)
    assert all(p.dtype == dtype for p in half.parameters())
    assert half.rotary.cos_sin.dtype == torch.float32
    with torch.no_grad():
        a = ref.compute_logits(ref(input_ids, torch.arange(48), dense_causal_attention()))
        b = half.compute_logits(half(input_ids, torch.arange(48), dense_causal_attention()))
    assert b.dtype == torch.float32
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    assert (a - b).abs().max().item() < 0.1 * a.abs().max().item()
