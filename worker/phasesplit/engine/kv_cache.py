"""The paged KV pool (`KVCache`) and its block accounting (`BlockManager`); attention over it is in
`attention.py`."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from phasesplit.transport.layout import KVLayout

if TYPE_CHECKING:
    from phasesplit.engine.sequence import Sequence


class KVCapacityError(RuntimeError):
    """The cache has too few free blocks for the request."""


class BlockManager:
    """Free list and block tables for `num_blocks` fixed-size blocks."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_block_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_block_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_for(seq.num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        assert not seq.block_table, f"{seq.request_id} already holds blocks"
        seq.block_table = self.take(self.blocks_for(seq.num_tokens))

    def take(self, n: int) -> list[int]:
        if n > self.num_free_blocks:
            raise KVCapacityError(f"need {n} KV blocks, {self.num_free_blocks} free of {self.num_blocks}")
        return [self.free_block_ids.popleft() for _ in range(n)]

    def free(self, block_ids: list[int]) -> None:
        """Return blocks taken by `take` (or held in a block table) to the free list."""
        self.free_block_ids.extend(block_ids)

    def deallocate(self, seq: Sequence) -> None:
        self.free(seq.block_table)
        seq.block_table = []

    def can_append(self, seq: Sequence) -> bool:
        """Whether the token about to be computed for `seq` has a slot (a new block may be needed)."""
        return len(seq.block_table) >= self.blocks_for(seq.num_tokens) or self.num_free_blocks > 0

    def may_append(self, seq: Sequence) -> None:
        if len(seq.block_table) < self.blocks_for(seq.num_tokens):
            seq.block_table.extend(self.take(1))


class KVCache:
    """For every layer a preallocated k and v tensor [num_blocks, block_size, num_kv_heads, head_dim]."""

    def __init__(self, layout: KVLayout, num_blocks: int, dtype: torch.dtype, device: torch.device | str):
        shape = (num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
        self.layout = layout
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layout.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layout.num_layers)]

    def write(self, layer: int, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
        # k, v: [T, Hkv, D]; slot = block_id * block_size + offset
        self.k[layer].view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k)
        self.v[layer].view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)


def bytes_per_block(layout: KVLayout, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * layout.num_layers * layout.block_size * layout.num_kv_heads * layout.head_dim * elem
