"""The Llama-family decoder (Llama 2/3, Qwen2, Mistral shapes) over flat token batches.

The model sees one flat batch of T tokens drawn from many sequences, each with its position.
Attention is supplied by the caller, who owns the (paged) KV cache: the model computes q/k/v and
rotary embeddings and hands them to `attention(layer_idx, q, k, v)`. Module and parameter names
follow Hugging Face (`model.layers.N.self_attn.q_proj.weight`, ...) so checkpoints load by name.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phasesplit.engine.config import ModelConfig
from phasesplit.engine.parallel import Shard, TensorParallel

# (layer_idx, q [T, num_heads, head_dim], k [T, num_kv_heads, head_dim], v [T, num_kv_heads, head_dim])
#   -> [T, num_heads, head_dim]; q and k already carry rotary embeddings.
AttentionFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalize in float32, scale in the model dtype (as transformers does).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """Inverse rotary frequencies [head_dim / 2], float32, with llama3 scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    if config.rope_scaling is None:
        return inv_freq
    s = config.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context_len = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """cos/sin for every position up to max_position_embeddings, computed and kept in float32.

    Not an nn.Module on purpose: `model.to(dtype)` must never round this cache. It follows the
    positions' device on first use.
    """

    def __init__(self, config: ModelConfig):
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32, device="cpu")
        freqs = positions[:, None] * rope_inv_freq(config)[None, :]  # [P, head_dim / 2]
        self.cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [P, head_dim]

    def __call__(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if self.cos_sin.device != positions.device:
            self.cos_sin = self.cos_sin.to(positions.device)
        cos, sin = self.cos_sin[positions].to(dtype).chunk(2, dim=-1)  # [T, head_dim / 2] each
        return cos[:, None, :], sin[:, None, :]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [T, heads, head_dim]; rotate-half convention (first half paired with second half).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class RowParallelLinear(nn.Module):
    """A linear layer whose input dimension is split across ranks: partial products are all-reduced,
    then the (whole) bias is added once. With one rank it is `nn.Linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if self.tp.size == 1:
            return F.linear(x, self.weight, self.bias)
        out = self.tp.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


class Attention(nn.Module):
    """This rank's attention heads (all of them with one rank) and the KV heads they read."""

    def __init__(self, config: ModelConfig, layer_idx: int, shard: Shard, tp: TensorParallel):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = len(shard.heads), len(shard.kv_heads), config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = RowParallelLinear(self.num_heads * self.head_dim, hidden, config.o_proj_bias, tp)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention: AttentionFn) -> Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attention(self.layer_idx, q, k, v)  # [T, num_heads, head_dim]
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard, tp: TensorParallel):
        super().__init__()
        inter = len(shard.intermediate)
        self.gate_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, False, tp)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, shard: Shard, tp: TensorParallel):
        super().__init__()
        self.self_attn = Attention(config, layer_idx, shard, tp)
        self.mlp = MLP(config, shard, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention: AttentionFn) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard, tp: TensorParallel):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, shard, tp) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Llama, Qwen2 and Mistral checkpoints all map onto this one module; with `tp`, one rank's shard
    of it (see `phasesplit.engine.parallel`)."""

    def __init__(self, config: ModelConfig, tp: TensorParallel = TensorParallel()):
        super().__init__()
        self.config = config
        self.tp = tp
        self.shard = Shard.of(config, tp)
        self.model = DecoderModel(config, self.shard, tp)
        self.lm_head = nn.Linear(config.hidden_size, len(self.shard.vocab), bias=False)
        if config.tie_word_embeddings and tp.size == 1:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(config)

    def forward(self, input_ids: Tensor, positions: Tensor, attention: AttentionFn) -> Tensor:
        # input_ids, positions: [T] (a flat batch of tokens from many sequences) -> hidden [T, hidden]
        if input_ids.shape != positions.shape or input_ids.dim() != 1:
            raise ValueError(
                f"input_ids and positions must both be 1-D [T], got {tuple(input_ids.shape)} and "
                f"{tuple(positions.shape)}"
            )
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, attention)
        return self.model.norm(x)

    def compute_logits(self, hidden: Tensor) -> Tensor | None:
        # hidden: [N, hidden] -> float32 logits [N, vocab] (on rank 0; None on the other ranks)
        logits = self.lm_head(hidden).float()
        if self.tp.size == 1:
            return logits
        pad = self.shard.vocab_per_rank - logits.shape[-1]
        parts = self.tp.gather_to_leader(F.pad(logits, (0, pad)) if pad else logits)
        return None if parts is None else torch.cat(parts, dim=-1)[:, : self.config.vocab_size]


def dense_causal_attention(scale: float | None = None) -> AttentionFn:
    """A reference AttentionFn for ONE sequence with no cache: full causal attention over the T
    tokens it is given (GQA aware). Used by parity tests and as the simplest correct baseline."""

    def attention(layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # q: [T, H, D], k/v: [T, KVH, D] -> [H, T, D] for SDPA
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale, enable_gqa=True
        )
        return out.transpose(0, 1)

    return attention
