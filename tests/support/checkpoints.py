"""Small Hugging Face checkpoints of each supported architecture, written by `transformers` with
random weights: the references the engine's logits are checked against."""

import json

import torch
import transformers

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4)),
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, head_dim=32)),
    "qwen2-bias-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1, rope_parameters=LLAMA3_ROPE)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=None)),
}


def to_classic_layout(config: dict) -> dict:
    """The layout published checkpoints use: rope_theta and rope_scaling at the top level."""
    config = dict(config)
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    config["rope_scaling"] = None if rope_type == "default" else {"rope_type": rope_type, **rope}
    return config


def write_checkpoint(path, case: str, layout: str, **overrides):
    """`overrides`: config fields over BASE's and the case's (e.g. the vocab_size of a tokenizer)."""
    config_cls, model_cls, extra = CASES[case]
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**BASE, **extra, **overrides}))
    with torch.no_grad():  # random everything (norms and biases too) so every weight shows in the logits
        for param in hf.parameters():
            param.normal_(0.0, 0.1 if param.dim() > 1 else 0.5).add_(1.0 if param.dim() == 1 else 0.0)
    hf.save_pretrained(path)
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    assert "rope_parameters" in config  # what transformers 5 writes
    if layout == "classic":
        config_path.write_text(json.dumps(to_classic_layout(config)))
    return getattr(transformers, model_cls)
