"""`ModelConfig`: a Hugging Face `config.json` (plus `generation_config.json`) read into one dataclass;
`EngineConfig`: how one engine runs it (free of torch: the worker's settings take their defaults from it)."""

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
MODEL_TYPE_TO_ARCHITECTURE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
DEFAULT_ROPE_THETA = 10000.0


@dataclass(slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = DEFAULT_ROPE_THETA
    rope_scaling: dict | None = None  # None for plain rotary; else {"rope_type": "llama3", "factor": ..., ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (always for Qwen2; Llama also biases o_proj)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str = "float32"
    # Mistral-style sliding window; attention here is always full, so the engine must not run past it.
    sliding_window: int | None = None

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}: supported are {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config field {name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"config field num_key_value_heads ({self.num_kv_heads}) must divide "
                f"num_attention_heads ({self.num_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"config field head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def o_proj_bias(self) -> bool:
        return self.attention_bias and self.architecture != "Qwen2ForCausalLM"

    @classmethod
    def from_dict(cls, d: dict, generation_config: dict | None = None) -> "ModelConfig":
        architecture = _architecture(d)
        _check_supported_options(d, architecture)
        num_heads = _require(d, "num_attention_heads")
        hidden_size = _require(d, "hidden_size")
        rope_theta, rope_scaling = _rope(d)
        eos = _as_list(d.get("eos_token_id")) + _as_list((generation_config or {}).get("eos_token_id"))
        return cls(
            architecture=architecture,
            vocab_size=_require(d, "vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=_require(d, "intermediate_size"),
            num_layers=_require(d, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or hidden_size // num_heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=architecture == "Qwen2ForCausalLM" or bool(d.get("attention_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=list(dict.fromkeys(eos)),
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
            sliding_window=_sliding_window(d, architecture),
        )

    @classmethod
    def from_dir(cls, path) -> "ModelConfig":
        path = Path(path)
        config_path = path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"config.json not found in model directory {path}")
        generation_path = path / "generation_config.json"
        generation = json.loads(generation_path.read_text()) if generation_path.is_file() else None
        return cls.from_dict(json.loads(config_path.read_text()), generation)


def _require(d: dict, key: str):
    if d.get(key) is None:
        raise ValueError(f"config.json: missing field {key!r}")
    return d[key]


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _architecture(d: dict) -> str:
    architectures = d.get("architectures") or []
    if architectures:
        return architectures[0]
    if d.get("model_type") in MODEL_TYPE_TO_ARCHITECTURE:
        return MODEL_TYPE_TO_ARCHITECTURE[d["model_type"]]
    raise ValueError(
        f"config.json: missing field 'architectures' (and model_type {d.get('model_type')!r} is not one of "
        f"{', '.join(MODEL_TYPE_TO_ARCHITECTURE)})"
    )


def _check_supported_options(d: dict, architecture: str) -> None:
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {d['hidden_act']!r} is not supported: only 'silu'")
    if d.get("mlp_bias"):
        raise ValueError("config.json: mlp_bias=true is not supported: only false")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {architecture!r}: supported are {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def _sliding_window(d: dict, architecture: str) -> int | None:
    if architecture == "Qwen2ForCausalLM" and not d.get("use_sliding_window", False):
        return None
    window = d.get("sliding_window")
    return int(window) if window else None


def _rope(d: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either layout: top-level `rope_theta`/`rope_scaling` (published
    checkpoints) or the `rope_parameters` dict that transformers 5 writes."""
    params = dict(d.get("rope_parameters") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("config.json: per-layer-type rope_parameters are not supported")
    theta = float(params.pop("rope_theta", None) or d.get("rope_theta") or DEFAULT_ROPE_THETA)
    scaling = params or dict(d.get("rope_scaling") or {})
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if float(scaling.pop("partial_rotary_factor", d.get("partial_rotary_factor") or 1.0)) != 1.0:
        raise ValueError("config.json: partial_rotary_factor other than 1.0 is not supported")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"config.json: rope type {rope_type!r} is not supported: supported are {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    scaling.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 2048))
    for key in LLAMA3_ROPE_KEYS:
        if key not in scaling:
            raise ValueError(f"config.json: llama3 rope scaling is missing field {key!r}")
    return theta, {"rope_type": rope_type, **{k: scaling[k] for k in LLAMA3_ROPE_KEYS}}


@dataclass(slots=True)
class EngineConfig:
    model_dir: str
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_memory_fraction: float = 0.8  # of the device memory free after loading the model (CUDA)
    max_num_batched_tokens: int = 2048  # tokens one step computes (a prompt not split runs whole, alone)
    chunked_prefill: bool = True  # split prompts across steps, after the running decodes
    prefix_caching: bool = True  # reuse the KV of full blocks earlier requests computed (block hashes)
    max_num_seqs: int = 64
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    served_model_name: str | None = None

    def __post_init__(self):
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name}: got {getattr(self, name)!r}, must be an integer > 0")
        for name in ("num_kv_blocks", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name}: got {value!r}, must be an integer > 0 or unset")
        for name in ("chunked_prefill", "prefix_caching"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: got {getattr(self, name)!r}, must be true or false")
        if self.chunked_prefill and self.max_num_batched_tokens < self.block_size:
            raise ValueError(f"max_num_batched_tokens: got {self.max_num_batched_tokens}, must be at least block_size "
                             f"({self.block_size}) with chunked prefill (a prompt worker's chunks are whole blocks)")
        if not 0 < self.kv_memory_fraction <= 1:
            raise ValueError(f"kv_memory_fraction: got {self.kv_memory_fraction!r}, must be in (0, 1]")
