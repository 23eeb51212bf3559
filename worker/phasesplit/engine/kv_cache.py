"""The paged KV pool (`KVCache`) and its block accounting (`BlockManager`); attention over it is in
`attention.py`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy
import torch
from torch import Tensor

from phasesplit.transport.layout import KVLayout

if TYPE_CHECKING:
    from phasesplit.engine.sequence import Sequence


class KVCapacityError(RuntimeError):
    """The cache has too few free blocks for the request."""


class BlockManager:
    """Block tables for `num_blocks` fixed-size blocks, allocated so that a sequence's blocks stay
    consecutive where they can (attention reads a run of consecutive blocks as one view): a new
    sequence goes to the middle of the largest free stretch, leaving room on both sides for its
    neighbours to grow into, and a growing sequence takes the block after its last when it is free."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.is_free = numpy.ones(num_blocks, dtype=bool)
        self.num_free_blocks = num_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_for(seq.num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        assert not seq.block_table, f"{seq.request_id} already holds blocks"
        seq.block_table = self.take(self.blocks_for(seq.num_tokens))

    def take(self, n: int, after: int | None = None) -> list[int]:
        """`n` free blocks, as few runs as the free stretches allow; with `after`, the block that
        follows it first when free."""
        if n > self.num_free_blocks:
            raise KVCapacityError(f"need {n} KV blocks, {self.num_free_blocks} free of {self.num_blocks}")
        if after is not None and n == 1 and after + 1 < self.num_blocks and self.is_free[after + 1]:
            ids = [after + 1]
        else:
            ids = self._from_stretches(n)
        self.is_free[ids] = False
        self.num_free_blocks -= n
        return ids

    def _from_stretches(self, n: int) -> list[int]:
        edges = numpy.flatnonzero(numpy.diff(self.is_free, prepend=False, append=False))
        starts, lengths = edges[0::2], edges[1::2] - edges[0::2]
        ids: list[int] = []
        for i in numpy.argsort(-lengths, kind="stable"):
            take = min(int(lengths[i]), n - len(ids))
            first = int(starts[i]) + (int(lengths[i]) - take) // 2
            ids.extend(range(first, first + take))
            if len(ids) == n:
                return ids
        raise AssertionError("fewer free blocks than counted")

    def free(self, block_ids: list[int]) -> None:
        """Return blocks taken by `take` (or held in a block table)."""
        assert not self.is_free[block_ids].any(), f"blocks freed twice: {block_ids}"
        self.is_free[block_ids] = True
        self.num_free_blocks += len(block_ids)

    def deallocate(self, seq: Sequence) -> None:
        self.free(seq.block_table)
        seq.block_table = []

    def can_append(self, seq: Sequence) -> bool:
        """Whether the token about to be computed for `seq` has a slot (a new block may be needed)."""
        return len(seq.block_table) >= self.blocks_for(seq.num_tokens) or self.num_free_blocks > 0

    def may_append(self, seq: Sequence) -> None:
        if len(seq.block_table) < self.blocks_for(seq.num_tokens):
            seq.block_table.extend(self.take(1, after=seq.block_table[-1] if seq.block_table else None))


class KVCache:
    """For every layer a preallocated k and v tensor, head-major: [num_kv_heads, num_blocks,
    block_size, head_dim]. The KV connector and the transports see blocks ([num_blocks, block_size,
    num_kv_heads, head_dim], the wire's order) through `blocks`."""

    def __init__(self, layout: KVLayout, num_blocks: int, dtype: torch.dtype, device: torch.device | str):
        shape = (layout.num_kv_heads, num_blocks, layout.block_size, layout.head_dim)
        self.layout = layout
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layout.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layout.num_layers)]

    def write(self, layer: int, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
        # k, v: [T, Hkv, D]; slot = block_id * block_size + offset
        for cache, new in ((self.k[layer], k), (self.v[layer], v)):
            cache.view(cache.shape[0], -1, cache.shape[-1]).index_copy_(1, slot_mapping, new.transpose(0, 1))

    def blocks(self, layer: int) -> tuple[Tensor, Tensor]:
        """Views of one layer's K and V as [num_blocks, block_size, num_kv_heads, head_dim]."""
        return self.k[layer].permute(1, 2, 0, 3), self.v[layer].permute(1, 2, 0, 3)


def bytes_per_block(layout: KVLayout, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * layout.num_layers * layout.block_size * layout.num_kv_heads * layout.head_dim * elem
