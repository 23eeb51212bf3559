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

from phasesplit.engine.attention import paged_attention, seq_spans
from phasesplit.engine.kv_cache import KVCache
from phasesplit.engine.model import LlamaForCausalLM

log = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class ForwardBatch:
    """One step as rank 0 scheduled it (CPU tensors and lists): everything a rank needs to run it.

    Each sequence brings some new tokens (one for a decode, a chunk of its prompt for a prefill) that
    attend to its cached context plus themselves; they are packed one sequence after the other."""

    request_ids: list[str]
    input_ids: Tensor  # [T]
    positions: Tensor  # [T]
    slot_mapping: Tensor  # [T]: where each token's K/V goes in the cache
    cu_seqlens: list[int]  # [0, n0, n0+n1, ...]: each sequence's new tokens
    context_lens: list[int]  # each sequence's tokens once the step has run (cached plus new)
    block_tables: list[list[int]]  # each sequence's blocks
    prefill_ids: list[str]  # the sequences whose prompt tokens this step computes (the layer hook's)

    def prefill_piece(self, request_id: str, block_size: int, since: int | None = None) -> tuple[int, list[int]]:
        """The blocks of a sequence's prompt KV up to what this step writes, from position `since` in
        its block table (by default the first block this step writes): that position and the ids.
        A chunk that does not end its prompt ends on a block boundary (`batching.take_chunks`), so
        the pieces of a prompt never share a block; blocks before the step's first were computed
        earlier or found in the prefix cache."""
        i = self.request_ids.index(request_id)
        num_cached = self.context_lens[i] - (self.cu_seqlens[i + 1] - self.cu_seqlens[i])
        first = num_cached // block_size if since is None else since
        return first, self.block_tables[i][first:-(-self.context_lens[i] // block_size)]


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
        """float32 logits [sequences, vocab] of each sequence's last new token (None on ranks other than 0)."""
        self.batch = batch
        slot_mapping = batch.slot_mapping.to(self.device)
        spans = seq_spans(batch.cu_seqlens, batch.context_lens, batch.block_tables, self.block_size)
        hook_ids = batch.prefill_ids

        def attention(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            self.kv_cache.write(layer, k, v, slot_mapping)
            if self.layer_hook is not None and hook_ids:
                self.layer_hook(layer, hook_ids)
            return paged_attention(q, k, v, self.kv_cache.k[layer], self.kv_cache.v[layer], spans)

        last = torch.tensor([end - 1 for end in batch.cu_seqlens[1:]], device=self.device)
        hidden = self.model(batch.input_ids.to(self.device), batch.positions.to(self.device), attention)
        return self.model.compute_logits(hidden[last])
