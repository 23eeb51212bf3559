"""`phasesplit make-tiny-model`: a loadable, deterministic Hugging Face checkpoint."""

import json
import subprocess
import sys

import pytest
import torch

from phasesplit.engine.loader import load_model
from phasesplit.engine.model import dense_causal_attention
from phasesplit.engine.tokenizer import Tokenizer
from phasesplit.tiny_model import main

FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_same_seed_same_bytes(tmp_path, tiny_model_dir):
    assert main([str(tmp_path / "again"), "--seed", "0"]) == 0
    for name in FILES:
        assert (tmp_path / "again" / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


def test_other_seed_other_weights_same_tokenizer(tmp_path, tiny_model_dir):
    assert main([str(tmp_path / "seed1"), "--seed", "1"]) == 0
    assert (tmp_path / "seed1" / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()
    assert (tmp_path / "seed1" / "model.safetensors").read_bytes() != (tiny_model_dir / "model.safetensors").read_bytes()


def test_checkpoint_is_a_tiny_llama_with_matching_tokenizer(tiny_model_dir):
    config, model = load_model(tiny_model_dir)
    tokenizer = Tokenizer.from_dir(tiny_model_dir)
    assert config.architecture == "LlamaForCausalLM"
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads) == (64, 2, 4, 2)
    assert config.max_position_embeddings == 2048
    assert tokenizer.vocab_size == config.vocab_size == 512
    assert config.bos_token_id == tokenizer.bos_token_id
    assert config.eos_token_ids == tokenizer.eos_token_ids  # <|eos|> and <|im_end|>
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_random_model_generates_varied_text(tiny_model_dir):
    _, model = load_model(tiny_model_dir)
    tokenizer = Tokenizer.from_dir(tiny_model_dir)
    ids = tokenizer.encode("The river town")
    prompt_len = len(ids)
    with torch.no_grad():
        for _ in range(24):  # greedy, recomputing the whole sequence each step
            hidden = model(torch.tensor(ids), torch.arange(len(ids)), dense_causal_attention())
            ids.append(int(model.compute_logits(hidden[-1:])[0].argmax()))
    generated = ids[prompt_len:]
    assert len(set(generated)) >= 8, generated  # not stuck repeating one token
    assert tokenizer.decode(generated)


def test_unknown_preset_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "x"), "--preset", "huge"])
    assert exit_info.value.code == 2
    assert "huge" in capsys.readouterr().err


def test_console_script_writes_a_model(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, "-m", "phasesplit.cli", "make-tiny-model", str(out), "--seed", "3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert sorted(p.name for p in out.iterdir()) == FILES
