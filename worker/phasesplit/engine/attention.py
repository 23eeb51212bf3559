"""Attention of a step's new tokens over each sequence's paged context.

A decode (one new token) and a prefill chunk (some prompt tokens) are the same computation: the
new tokens' queries attend causally to the sequence's cached tokens plus themselves. Their K/V are
written to the cache first, so the whole context is read through the block table. The cache is
head-major ([kv_heads, num_blocks, block_size, head_dim], `kv_cache.KVCache`), so a run of
consecutive blocks is, for every KV head at once, one strided view of contiguous rows: a decode
is two batched matrix products per run over those views, never a copy of its context. A prompt
chunk over cached blocks runs SDPA on the same views (its causal mask aligned to the context's end),
and a prompt with nothing cached yet SDPA on its own K/V. On CUDA flash-attn's paged kernel runs it
when installed (half precision, blocks of a multiple of 256 tokens). bench/engine.py measures the
path against the gather it replaced; the README has the figures and the alternatives tried.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from flash_attn import flash_attn_with_kvcache
except ImportError:  # the CPU image and CUDA images without flash-attn
    flash_attn_with_kvcache = None

FLASH_BLOCK_MULTIPLE = 256  # flash-attn's paged KV wants blocks of a multiple of this many tokens
MAX_VIEWS = 8  # a decode whose context is in more runs of blocks than this reads it joined (one copy)


@dataclasses.dataclass(frozen=True, slots=True)
class SeqSpan:
    """One sequence of a step: its new tokens are rows `start:end` of the batch, the last of them at
    position `context_len - 1`; its context (cached and new tokens) lies in `runs` of consecutive
    blocks, (first block id, number of blocks) each."""

    start: int
    end: int
    context_len: int
    block_ids: tuple[int, ...]
    runs: tuple[tuple[int, int], ...]

    @property
    def num_new(self) -> int:
        return self.end - self.start

    @property
    def num_cached(self) -> int:
        return self.context_len - self.num_new


def seq_spans(cu_seqlens: list[int], context_lens: list[int], block_tables: list[list[int]],
              block_size: int) -> list[SeqSpan]:
    spans = []
    for i, context_len in enumerate(context_lens):
        block_ids = tuple(block_tables[i][: -(-context_len // block_size)])
        spans.append(SeqSpan(cu_seqlens[i], cu_seqlens[i + 1], context_len, block_ids, block_runs(block_ids)))
    return spans


def block_runs(block_ids: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """(first, count) for each stretch of consecutive ids: `(4, 5, 6, 9)` -> `((4, 3), (9, 1))`."""
    runs: list[list[int]] = []
    for b in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1][1] += 1
        else:
            runs.append([b, 1])
    return tuple((first, count) for first, count in runs)


def paged_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                    spans: list[SeqSpan]) -> Tensor:
    """q [T, H, D] and the step's own k/v [T, Hkv, D] (already written to the cache), one layer's
    head-major cache [Hkv, num_blocks, block_size, D] -> [T, H, D]."""
    if _flash_fits(q, k_cache):
        return _flash_paged(q, k_cache, v_cache, spans)
    out = torch.empty_like(q)
    for s in spans:
        rows = slice(s.start, s.end)
        if s.num_new == 1:
            out[rows] = _decode(q[rows], k_cache, v_cache, s)
        elif s.num_cached == 0:
            out[rows] = _causal_sdpa(q[rows], k[rows], v[rows])
        else:
            out[rows] = _chunk(q[rows], k_cache, v_cache, s)
    return out


def context_views(cache: Tensor, span: SeqSpan, max_views: int | None = None) -> list[Tensor]:
    """The span's context in one layer's head-major cache, one view [Hkv, tokens, D] per run of
    consecutive blocks; joined into one tensor when there are more runs than `max_views`."""
    if max_views is not None and len(span.runs) > max_views:
        index = torch.tensor(span.block_ids, device=cache.device)
        return [cache.index_select(1, index).flatten(1, 2)[:, :span.context_len]]
    views, left = [], span.context_len
    for first, count in span.runs:
        view = cache[:, first:first + count].flatten(1, 2)[:, :left]
        views.append(view)
        left -= view.shape[1]
    return views


def _decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, span: SeqSpan) -> Tensor:
    """q [1, H, D]: each KV head's query group against its keys, run by run; the scores are joined
    before the softmax (they are small: group x tokens), the values summed run by run."""
    num_kv_heads, head_dim = k_cache.shape[0], k_cache.shape[-1]
    qg = q.view(num_kv_heads, -1, head_dim) * head_dim**-0.5  # [Hkv, G, D]
    keys, values = context_views(k_cache, span, MAX_VIEWS), context_views(v_cache, span, MAX_VIEWS)
    scores = [torch.bmm(qg, key.transpose(1, 2)) for key in keys]
    probs = _softmax(scores[0] if len(scores) == 1 else torch.cat(scores, dim=-1))  # [Hkv, G, L]
    out, at = None, 0
    for value in values:
        n = value.shape[1]
        part = probs[..., at:at + n]
        out = torch.bmm(part, value) if out is None else out.baddbmm_(part, value)
        at += n
    return out.view(1, -1, head_dim)


def _softmax(scores: Tensor) -> Tensor:
    if scores.dtype == torch.float32:
        return scores.softmax(-1)
    return scores.float().softmax(-1).to(scores.dtype)


def _chunk(q: Tensor, k_cache: Tensor, v_cache: Tensor, span: SeqSpan) -> Tensor:
    """q [n, H, D]: a prompt chunk over its whole context (cached and its own tokens). Its queries
    see every cached token and, causally, the chunk; the context is a view when its blocks are one
    run, else joined (a prefill chunk is compute-bound: the copy is small beside its products)."""
    (key,), (value,) = context_views(k_cache, span, 1), context_views(v_cache, span, 1)
    positions = torch.arange(span.num_cached, span.context_len, device=q.device)
    visible = torch.arange(span.context_len, device=q.device)[None, :] <= positions[:, None]
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], key[None], value[None], attn_mask=visible,
                                       enable_gqa=True)
    return o[0].transpose(0, 1)


def _causal_sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    # q [n, H, D], k/v [n, Hkv, D]: a fresh prompt attends only within itself. Batched 4-d inputs take
    # the fused CPU kernel (3-d ones measured 5x slower at 2,500 tokens).
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       is_causal=True, enable_gqa=True)
    return o[0].transpose(0, 1)


def _flash_fits(q: Tensor, k_cache: Tensor) -> bool:
    return (flash_attn_with_kvcache is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and k_cache.shape[2] % FLASH_BLOCK_MULTIPLE == 0)


def _flash_paged(q: Tensor, k_cache: Tensor, v_cache: Tensor, spans: list[SeqSpan]) -> Tensor:
    # flash-attn takes [num_blocks, block_size, Hkv, D]: the head-major cache seen through its strides
    k_blocks, v_blocks = k_cache.permute(1, 2, 0, 3), v_cache.permute(1, 2, 0, 3)
    out = torch.empty_like(q)
    for s in spans:
        block_table = torch.tensor([s.block_ids], dtype=torch.int32, device=q.device)
        cache_seqlens = torch.tensor([s.context_len], dtype=torch.int32, device=q.device)
        o = flash_attn_with_kvcache(q[None, s.start:s.end], k_blocks, v_blocks, cache_seqlens=cache_seqlens,
                                    block_table=block_table, causal=True)  # causal: aligned to the context's end
        out[s.start:s.end] = o[0]
    return out
