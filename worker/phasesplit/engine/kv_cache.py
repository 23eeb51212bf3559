"""The paged KV pool (`KVCache`); its block accounting is `block_manager.py`, attention over it
`attention.py`."""

from __future__ import annotations

import torch
from torch import Tensor

from phasesplit.engine.block_manager import BlockManager, KVCapacityError
from phasesplit.transport.layout import KVLayout

__all__ = ["BlockManager", "KVCache", "KVCapacityError", "KVLayout", "bytes_per_block"]


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
