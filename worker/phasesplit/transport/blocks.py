"""Cache blocks as raw bytes: zero-copy views on the sending side, direct writes on the receiving side.

A layer cache is [num_blocks, block_size, kv_heads, head_dim]; one block's bytes are contiguous
in a contiguous cache, so a run of consecutive block ids is one slice of the cache's bytes.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch

from phasesplit.transport.base import KVDataLoss


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, flat, no copy (works for bfloat16 too)."""
    return memoryview(t.view(torch.uint8).numpy().reshape(-1))


def runs(ids: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """(offset in ids, first id, length) for each run of consecutive ids."""
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            yield start, ids[start], i - start
            start = i


def to_host(cache: torch.Tensor, ids: Sequence[int], ready: object | None) -> tuple[torch.Tensor, list[int]]:
    """A contiguous CPU tensor and the positions of `ids` in it.

    CPU and contiguous: the cache itself (no copy). Otherwise one gather; from an accelerator,
    into pinned host memory, after `ready` (an event recorded when the layer was written)."""
    if cache.device.type == "cpu":
        if cache.is_contiguous():
            return cache, list(ids)
        return cache[list(ids)].contiguous(), list(range(len(ids)))
    index = torch.tensor(list(ids), device=cache.device)
    stream = torch.cuda.Stream(cache.device) if cache.device.type == "cuda" else None
    if stream is None:
        return cache.index_select(0, index).cpu(), list(range(len(ids)))
    with torch.cuda.stream(stream):
        if ready is not None:
            stream.wait_event(ready)
        gathered = cache.index_select(0, index)
        host = torch.empty(gathered.shape, dtype=cache.dtype, pin_memory=True)
        host.copy_(gathered, non_blocking=True)
    stream.synchronize()
    return host, list(range(len(ids)))


def read_pieces(host: torch.Tensor, ids: Sequence[int], start: int, count: int) -> list[memoryview]:
    """Views of blocks ids[start:start + count] of a contiguous CPU tensor, one per run."""
    view = byte_view(host)
    size = view.nbytes // host.shape[0]
    return [view[first * size:(first + n) * size] for _, first, n in runs(ids[start:start + count])]


def write_blocks(cache: torch.Tensor, ids: Sequence[int], data: memoryview) -> None:
    """Copy `data` (raw bytes of len(ids) blocks, in order) into blocks `ids` of `cache`."""
    size = cache[0].numel() * cache.element_size()
    if len(data) != len(ids) * size:
        raise ValueError(f"data holds {len(data)} bytes, {len(ids)} blocks need {len(ids) * size}")
    if cache.device.type == "cpu" and cache.is_contiguous():
        view = byte_view(cache)
        for offset, first, n in runs(ids):
            view[first * size:(first + n) * size] = data[offset * size:(offset + n) * size]
        return
    with warnings.catch_warnings():  # a read-only buffer is only read here
        warnings.simplefilter("ignore", UserWarning)
        src = torch.frombuffer(data, dtype=torch.uint8)
    src = src.view(cache.dtype).view(len(ids), *cache.shape[1:])
    cache.index_copy_(0, torch.tensor(list(ids), device=cache.device), src.to(cache.device))


class CacheDestination:
    """The writes of a KVDestination (see `base.KVDestination`) into blocks `block_ids` of paged caches.

    A subclass sets `block_ids` and `lock`, and implements `cache(layer, kind)`: the layer's K or V
    cache, or a TransferError once the destination is closed. Every write runs under `lock`, so
    whoever frees the blocks under that lock never frees them while a write is under way."""

    block_ids: list[int]
    lock: threading.Lock

    def cache(self, layer: int, kind: int) -> torch.Tensor:
        raise NotImplementedError

    def written(self) -> None:
        """Called (under `lock`) after each write."""

    def write(self, layer: int, kind: int, block_start: int, block_count: int, data: memoryview) -> None:
        with self.lock:
            cache, ids = self._target(layer, kind, block_start, block_count)
            write_blocks(cache, ids, data)
            self.written()

    def write_tensor(self, layer: int, kind: int, block_start: int, src: torch.Tensor) -> None:
        if src.device.type == "cpu":  # a byte copy on this thread, off torch's intra-op pool (the engine's)
            self.write(layer, kind, block_start, src.shape[0], byte_view(src.contiguous()))
            return
        with self.lock:
            cache, ids = self._target(layer, kind, block_start, src.shape[0])
            cache.index_copy_(0, torch.tensor(ids, device=cache.device), src.to(cache.device))
            self.written()

    def receive(self, layer: int, kind: int, block_start: int, block_count: int,
                fill: Callable[[list[memoryview]], None]) -> None:
        with self.lock:
            cache, ids = self._target(layer, kind, block_start, block_count)
            if cache.device.type == "cpu" and cache.is_contiguous():
                view = byte_view(cache)
                size = view.nbytes // cache.shape[0]
                fill([view[first * size:(first + n) * size] for _, first, n in runs(ids)])
            else:
                staging = torch.empty((len(ids), *cache.shape[1:]), dtype=cache.dtype,
                                      pin_memory=cache.device.type == "cuda")
                fill([byte_view(staging)])
                cache.index_copy_(0, torch.tensor(ids, device=cache.device), staging.to(cache.device))
            self.written()

    def _target(self, layer: int, kind: int, block_start: int, block_count: int) -> tuple[torch.Tensor, list[int]]:
        cache = self.cache(layer, kind)
        if block_start < 0 or block_count < 1 or block_start + block_count > len(self.block_ids):
            raise KVDataLoss(f"blocks [{block_start}, {block_start + block_count}) are outside the "
                             f"{len(self.block_ids)} reserved")
        return cache, self.block_ids[block_start:block_start + block_count]
