"""`ModelRunner`: one forward pass of a scheduled batch over the model and its paged KV cache.

Rank 0 schedules a `ForwardBatch` and, with tensor parallelism, broadcasts it; every rank runs it
on its own shard of the model and of the KV cache (`follow` is the other ranks' whole life, and
passes on the other messages rank 0 sends: see `LLMEngine.send_to_ranks`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch
from torch import Tensor

from phasesplit.engine.kv_cache import KVCache, decode_attention, prefill_attention
from phasesplit.engine.model import LlamaForCausalLM

log = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class ForwardBatch:
    """One step as rank 0 scheduled it (CPU tensors): everything a rank needs to run it."""

    request_ids: list[str]
    input_ids: Tensor  # [T]
    positions: Tensor  # [T]
    slot_mapping: Tensor  # [T]: where each token's K/V goes in the cache
    cu_seqlens: list[int] | None = None  # prefill: [0, n0, n0+n1, ...]
    block_tables: Tensor | None = None  # decode: [B, max_blocks]
    context_lens: Tensor | None = None  # decode: [B]

    @property
    def is_prefill(self) -> bool:
        return self.cu_seqlens is not None

    def prefill_blocks(self, request_id: str, block_size: int) -> list[int]:
        """The cache blocks a prefilled sequence's KV went to (its tokens start at position 0)."""
        i = self.request_ids.index(request_id)
        first_slots = self.slot_mapping[self.cu_seqlens[i]:self.cu_seqlens[i + 1]:block_size]
        return (first_slots // block_size).tolist()


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, block_size: int, device: torch.device):
        self.model = model
        self.tp = model.tp
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device
        self.layer_hook: Callable[[int, list[str]], None] | None = None
        self.batch: ForwardBatch | None = None  # the batch being run (layer hooks read it)

    def run(self, batch: ForwardBatch) -> Tensor | None:
        """Rank 0: the batch on every rank; float32 logits [sequences, vocab] of its next tokens."""
        if self.tp.size > 1:
            self.tp.broadcast(batch)
        return self.forward(batch)

    def stop_followers(self) -> None:
        if self.tp.size > 1:
            self.tp.broadcast(None)

    def follow(self, on_message: Callable[[object], None] | None = None) -> None:
        """Ranks other than 0: run the batches rank 0 broadcasts, and hand anything else it sends to
        `on_message`, until it says stop."""
        while (item := self.tp.broadcast(None)) is not None:
            if isinstance(item, ForwardBatch):
                self.forward(item)
            elif on_message is not None:
                try:
                    on_message(item)
                except Exception:  # noqa: BLE001 - rank 0 reports its own result; this one only logs
                    log.exception("rank %d: message %r failed", self.tp.rank, item)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> Tensor | None:
        self.batch = batch
        slot_mapping = batch.slot_mapping.to(self.device)
        if batch.is_prefill:
            cu_seqlens, request_ids = batch.cu_seqlens, batch.request_ids

            def attention(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                self.kv_cache.write(layer, k, v, slot_mapping)
                if self.layer_hook is not None:
                    self.layer_hook(layer, request_ids)
                return prefill_attention(q, k, v, cu_seqlens)

            last = torch.tensor([end - 1 for end in cu_seqlens[1:]], device=self.device)
        else:
            block_tables = batch.block_tables.to(self.device)
            context_lens = batch.context_lens.to(self.device)
            length = block_tables.shape[1] * self.block_size
            mask = (torch.arange(length, device=self.device)[None, :] < context_lens[:, None])[:, None, None, :]

            def attention(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                self.kv_cache.write(layer, k, v, slot_mapping)
                k_ctx, v_ctx = self.kv_cache.gather(layer, block_tables)
                return decode_attention(q, k_ctx, v_ctx, mask)

            last = None
        hidden = self.model(batch.input_ids.to(self.device), batch.positions.to(self.device), attention)
        return self.model.compute_logits(hidden if last is None else hidden[last])
