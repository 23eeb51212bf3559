"""Paged attention against plain SDPA over each sequence's context copied out of the cache: decodes
and prompt chunks in one batch, blocks consecutive or scattered, contexts ending mid-block."""

import pytest
import torch
import torch.nn.functional as F

from phasesplit.engine.attention import block_runs, paged_attention, seq_spans

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 6, 2, 8, 4


def reference(q, k_cache, v_cache, span):
    blocks = list(span.block_ids)
    k = k_cache[:, blocks].flatten(1, 2)[:, :span.context_len]
    v = v_cache[:, blocks].flatten(1, 2)[:, :span.context_len]
    visible = torch.arange(span.context_len)[None, :] <= (span.num_cached + torch.arange(span.num_new))[:, None]
    return F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=visible, enable_gqa=True).transpose(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_mixed_batch_attends_as_sdpa_over_the_copied_context(dtype):
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(KV_HEADS, 40, BLOCK_SIZE, HEAD_DIM, generator=gen).to(dtype)
    v_cache = torch.randn(KV_HEADS, 40, BLOCK_SIZE, HEAD_DIM, generator=gen).to(dtype)
    # (block table, context length, new tokens): decodes over consecutive and scattered blocks, a chunk
    # over a cached prefix, a fresh prompt, a one-token context
    cases = [([3, 4, 5, 9, 10], 18, 1), ([20, 1], 5, 1), ([7, 8, 30, 31, 32, 2], 23, 4), ([11, 12, 13], 10, 10),
             ([0], 1, 1)]
    cu_seqlens = [0]
    for _, _, n in cases:
        cu_seqlens.append(cu_seqlens[-1] + n)
    q = torch.randn(cu_seqlens[-1], HEADS, HEAD_DIM, generator=gen).to(dtype)
    spans = seq_spans(cu_seqlens, [c for _, c, _ in cases], [t for t, _, _ in cases], BLOCK_SIZE)
    # the step's own K/V: what the runner has just written to the cache
    k = torch.cat([k_cache[:, list(s.block_ids)].flatten(1, 2)[:, s.num_cached:s.context_len].transpose(0, 1)
                   for s in spans])
    v = torch.cat([v_cache[:, list(s.block_ids)].flatten(1, 2)[:, s.num_cached:s.context_len].transpose(0, 1)
                   for s in spans])
    out = paged_attention(q, k, v, k_cache, v_cache, spans)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for s in spans:
        expected = reference(q[s.start:s.end].float(), k_cache.float(), v_cache.float(), s)
        assert (out[s.start:s.end].float() - expected).abs().max().item() <= tolerance, s


def test_block_runs_group_consecutive_ids():
    assert block_runs((4, 5, 6, 9, 3, 4)) == ((4, 3), (9, 1), (3, 2))
    assert block_runs(()) == ()
