"""Attention of a step's new tokens over each sequence's paged context.

A decode (one new token) and a prefill chunk (some prompt tokens) are the same computation: the
new tokens' queries attend causally to the sequence's cached tokens plus themselves. Their K/V are
written to the cache first, so the whole context is read through the block table; consecutive
block ids are one view of the cache, never a copy. On CUDA flash-attn's paged kernel runs it when
installed (it needs half precision and blocks of a multiple of 256 tokens). Otherwise each
sequence is computed on its block views: a decode as two matrix products per run of consecutive
blocks, a chunk as per-head products a few rows at a time, and a prompt with nothing cached yet
through SDPA on its own K/V. On CPU these measured fastest; SDPA on strided block views, a
per-block online-softmax loop and flex_attention (unfused without torch.compile) were slower
(bench/engine.py compares the path with the gather it replaced).
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
SCORE_BYTES = 32 * 2**20  # a prefill chunk's scores are computed this many bytes at a time


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
    cache [num_blocks, block_size, Hkv, D] -> [T, H, D]."""
    if _flash_fits(q, k_cache):
        return _flash_paged(q, k_cache, v_cache, spans)
    out = torch.empty_like(q)
    decodes = [s for s in spans if s.num_new == 1]
    if decodes:
        rows = [s.start for s in decodes]
        out[rows] = _decode_over_blocks(q[rows], k_cache, v_cache, decodes)
    for s in spans:
        if s.num_new > 1 and s.num_cached == 0:
            out[s.start:s.end] = _causal_sdpa(q[s.start:s.end], k[s.start:s.end], v[s.start:s.end])
        elif s.num_new > 1:
            out[s.start:s.end] = _chunk_over_blocks(q[s.start:s.end], k_cache, v_cache, s)
    return out


def _flash_fits(q: Tensor, k_cache: Tensor) -> bool:
    return (flash_attn_with_kvcache is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and k_cache.shape[1] % FLASH_BLOCK_MULTIPLE == 0)


def _causal_sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    # q [n, H, D], k/v [n, Hkv, D]: a fresh prompt attends only within itself
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                       is_causal=True, enable_gqa=True)
    return o.transpose(0, 1)


def _decode_over_blocks(q: Tensor, k_cache: Tensor, v_cache: Tensor, spans: list[SeqSpan]) -> Tensor:
    """q [B, H, D]: one new token per span over its context, as two matrix products per run of blocks
    on the cache's own layout ([tokens, Hkv * D] rows). The queries are laid out block-diagonally
    ([Hkv * D, H] per token), so each KV head's keys meet only the query heads that share it."""
    b, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    eye = torch.eye(num_kv_heads, dtype=q.dtype, device=q.device)
    q_diag = torch.einsum("hx,bhgd->bhdxg", eye, q.view(b, num_kv_heads, -1, head_dim) * head_dim**-0.5)
    q_diag = q_diag.reshape(b, num_kv_heads * head_dim, num_heads)
    k_rows, v_rows = k_cache.view(-1, num_kv_heads * head_dim), v_cache.view(-1, num_kv_heads * head_dim)
    block_size = k_cache.shape[1]
    mixed = torch.empty(b, num_heads, num_kv_heads * head_dim, dtype=q.dtype, device=q.device)
    for i, span in enumerate(spans):
        slices, left = [], span.context_len  # the context's rows, one slice per run of blocks
        for first, count in span.runs:
            n = min(left, count * block_size)
            slices.append(slice(first * block_size, first * block_size + n))
            left -= n
        parts = [k_rows[r] @ q_diag[i] for r in slices]
        probs = _softmax(parts[0] if len(parts) == 1 else torch.cat(parts), 0)  # [L, H]
        at = 0
        for r in slices:  # each query head against every KV head: its own is on the diagonal
            n = r.stop - r.start
            if at == 0:
                torch.matmul(probs[:n].T, v_rows[r], out=mixed[i])
            else:
                mixed[i] += probs[at:at + n].T @ v_rows[r]
            at += n
    out = mixed.view(b, num_kv_heads, -1, num_kv_heads, head_dim).diagonal(dim1=1, dim2=3)  # [B, G, D, Hkv]
    return out.permute(0, 3, 1, 2).reshape(b, num_heads, head_dim)


def _softmax(scores: Tensor, dim: int) -> Tensor:
    if scores.dtype == torch.float32:
        return scores.softmax(dim)
    return scores.float().softmax(dim).to(scores.dtype)


def _chunk_over_blocks(q: Tensor, k_cache: Tensor, v_cache: Tensor, span: SeqSpan) -> Tensor:
    """q [n, H, D]: a prompt chunk over its whole context (cached and its own tokens) read from block
    views; causal, its scores computed a few rows at a time."""
    n, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    keys, values = _views(k_cache, span), _views(v_cache, span)
    qg = q.view(n, num_kv_heads, num_heads // num_kv_heads, head_dim) * head_dim**-0.5  # [n, Hkv, G, D]
    rows = max(1, SCORE_BYTES // (4 * num_heads * span.context_len))
    out = torch.empty_like(qg)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        scores = torch.cat([torch.einsum("nhgd,lhd->hgnl", qg[r0:r1], key) for key in keys], dim=-1)
        positions = torch.arange(span.num_cached + r0, span.num_cached + r1, device=q.device)
        future = torch.arange(span.context_len, device=q.device)[None, :] > positions[:, None]
        scores = scores.masked_fill(future, float("-inf"))
        probs = _softmax(scores, -1)  # [Hkv, G, rows, L]
        acc, at = None, 0
        for value in values:
            part = torch.einsum("hgnl,lhd->nhgd", probs[..., at:at + value.shape[0]], value)
            acc, at = part if acc is None else acc + part, at + value.shape[0]
        out[r0:r1] = acc
    return out.view(n, num_heads, head_dim)


def _views(cache: Tensor, span: SeqSpan) -> list[Tensor]:
    """The span's context as views of the cache, one per run of consecutive blocks: [tokens, Hkv, D]."""
    views, left = [], span.context_len
    for first, count in span.runs:
        view = cache[first:first + count].flatten(0, 1)[:left]
        views.append(view)
        left -= view.shape[0]
    return views


def _flash_paged(q: Tensor, k_cache: Tensor, v_cache: Tensor, spans: list[SeqSpan]) -> Tensor:
    out = torch.empty_like(q)
    for s in spans:
        block_table = torch.tensor([s.block_ids], dtype=torch.int32, device=q.device)
        cache_seqlens = torch.tensor([s.context_len], dtype=torch.int32, device=q.device)
        o = flash_attn_with_kvcache(q[None, s.start:s.end], k_cache, v_cache, cache_seqlens=cache_seqlens,
                                    block_table=block_table, causal=True)  # causal: aligned to the context's end
        out[s.start:s.end] = o[0]
    return out
