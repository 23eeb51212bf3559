"""`phasesplit make-tiny-model DIR [--seed N] [--preset tiny|small]`: a random-weight Llama checkpoint
in Hugging Face format with a real byte-level BPE tokenizer trained on the text the project ships.
Same seed, same bytes."""

import argparse
import json
import os
from importlib import resources
from pathlib import Path

from phasesplit.cli_format import HelpFormatter

BOS, EOS, IM_START, IM_END = "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END]  # ids 0..3, in this order
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

PRESETS = {
    # hidden 64, 2 layers, GQA 4/2: loads and runs in well under a second (tests, demo).
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
    # about 94M parameters (benchmarks); the vocabulary stays near what the shipped corpus can teach BPE.
    "small": dict(vocab_size=2048, hidden_size=768, intermediate_size=2560, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=4096),
}
INIT_STD = 0.02  # as Hugging Face initializes Llama: keeps random logits spread but not saturated


def corpus_texts() -> list[str]:
    data = resources.files("phasesplit") / "data"
    return [p.read_text(encoding="utf-8") for p in sorted(data.iterdir(), key=lambda p: p.name) if p.name.endswith(".txt")]


def train_tokenizer(vocab_size: int):
    """A byte-level BPE trained on the shipped corpus, padded with reserved special tokens to vocab_size."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus_texts(), trainer=trainer)
    reserved = vocab_size - tokenizer.get_vocab_size(with_added_tokens=True)
    tokenizer.add_special_tokens([f"<|reserved_{i}|>" for i in range(reserved)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    return tokenizer


def model_config(preset: str, tokenizer) -> dict:
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **PRESETS[preset],
        "head_dim": PRESETS[preset]["hidden_size"] // PRESETS[preset]["num_attention_heads"],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
        "torch_dtype": "float32",
    }


def random_weights(config: dict, seed: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_out = config["num_attention_heads"] * config["head_dim"]
    kv_out = config["num_key_value_heads"] * config["head_dim"]

    def normal(*shape):
        return torch.randn(*shape, generator=gen) * INIT_STD

    weights = {"model.embed_tokens.weight": normal(vocab, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "self_attn.q_proj.weight": normal(q_out, h),
            p + "self_attn.k_proj.weight": normal(kv_out, h),
            p + "self_attn.v_proj.weight": normal(kv_out, h),
            p + "self_attn.o_proj.weight": normal(h, q_out),
            p + "mlp.gate_proj.weight": normal(inter, h),
            p + "mlp.up_proj.weight": normal(inter, h),
            p + "mlp.down_proj.weight": normal(h, inter),
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
        }
    weights["model.norm.weight"] = torch.ones(h)
    weights["lm_head.weight"] = normal(vocab, h)
    return weights


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def make_tiny_model(out_dir, seed: int = 0, preset: str = "tiny") -> Path:
    from safetensors.torch import save_file

    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is not known: choose one of {', '.join(PRESETS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(PRESETS[preset]["vocab_size"])
    config = model_config(preset, tokenizer)
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=True)
    write_json(out_dir / "config.json", config)
    write_json(out_dir / "generation_config.json", {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": [config["eos_token_id"], tokenizer.token_to_id(IM_END)],
    })
    write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    })
    save_file(random_weights(config, seed), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phasesplit make-tiny-model", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("dir", help="output directory (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the weights")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="tiny: for tests and the demo; small: about 100M parameters, for benchmarks")
    args = parser.parse_args(argv)
    out = make_tiny_model(args.dir, seed=args.seed, preset=args.preset)
    print(f"wrote {args.preset} model (seed {args.seed}) to {out}")
    return 0
