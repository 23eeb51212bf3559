"""Loading Hugging Face model directories: sharded weights, both config layouts, clear errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from phasesplit.engine.config import ModelConfig
from phasesplit.engine.loader import load_model
from phasesplit.engine.model import dense_causal_attention


@pytest.fixture
def model_dir(tiny_model_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_model_dir, target)
    return target


def logits_of(model, n=24):
    ids = torch.arange(5, 5 + n)
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(n), dense_causal_attention()))


def edit_json(path, **changes):
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_sharded_weights_with_index_load_the_same_model(model_dir, tiny_model_dir):
    tensors = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, shard in shards.items():
        save_file({n: tensors[n] for n in shard}, model_dir / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, shard in shards.items() for n in shard}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    _, sharded = load_model(model_dir)
    _, single = load_model(tiny_model_dir)
    assert torch.equal(logits_of(sharded), logits_of(single))


def test_shard_missing_from_disk_is_named(model_dir):
    tensors = load_file(model_dir / "model.safetensors")
    index = {"weight_map": {n: "model-00002-of-00002.safetensors" for n in tensors}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_model(model_dir)


def test_missing_config_json_is_named(model_dir):
    (model_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(model_dir)


def test_missing_weights_are_named(model_dir):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"\*\.safetensors"):
        load_model(model_dir)


def test_missing_tensor_is_named(model_dir):
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(model_dir)


def test_wrong_shape_is_named_with_both_shapes(model_dir):
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(ValueError, match=r"k_proj\.weight.*\(8, 64\).*\(32, 64\)"):
        load_model(model_dir)


def test_unexpected_tensor_is_refused(model_dir):
    """A bias the config does not declare would otherwise be silently dropped."""
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(ValueError, match=r"q_proj\.bias"):
        load_model(model_dir)


def test_unsupported_architecture_is_named_with_the_supported_ones(model_dir):
    edit_json(model_dir / "config.json", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen2ForCausalLM.*MistralForCausalLM"):
        load_model(model_dir)


def test_missing_config_field_is_named(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    del config["hidden_size"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hidden_size"):
        load_model(model_dir)


def test_unknown_dtype_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="'int8'.*float32, bfloat16 or float16"):
        load_model(tiny_model_dir, dtype="int8")


def test_dtype_defaults_to_the_checkpoint_and_can_be_overridden(tiny_model_dir):
    config, model = load_model(tiny_model_dir)
    assert config.torch_dtype == "float32" and model.lm_head.weight.dtype == torch.float32
    _, model = load_model(tiny_model_dir, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_unsupported_rope_type_is_named(model_dir):
    edit_json(model_dir / "config.json", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="'yarn'.*default, llama3"):
        load_model(model_dir)


def test_both_config_layouts_read_the_same():
    common = dict(architectures=["LlamaForCausalLM"], vocab_size=128, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
    classic = ModelConfig.from_dict(common | {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **scaling}})
    older = ModelConfig.from_dict(common | {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **scaling}})
    v5 = ModelConfig.from_dict(common | {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **scaling}})
    assert classic == older == v5
    assert v5.rope_theta == 500000.0 and v5.rope_scaling == {"rope_type": "llama3", **scaling}
    plain = ModelConfig.from_dict(common | {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert plain.rope_theta == 1e6 and plain.rope_scaling is None and plain.head_dim == 16


def test_eos_ids_merge_config_and_generation_config(model_dir):
    edit_json(model_dir / "config.json", eos_token_id=1)
    edit_json(model_dir / "generation_config.json", eos_token_id=[3, 1])
    config = ModelConfig.from_dir(model_dir)
    assert config.eos_token_ids == [1, 3]
    assert config.bos_token_id == 0


def test_model_runs_on_the_device_it_was_loaded_on(tiny_model_dir):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _, model = load_model(tiny_model_dir, device=device)
    assert {p.device.type for p in model.parameters()} == {device}
    ids = torch.arange(8, device=device)
    with torch.no_grad():
        logits = model.compute_logits(model(ids, torch.arange(8, device=device), dense_causal_attention()))
    assert logits.device.type == device and torch.isfinite(logits).all()
