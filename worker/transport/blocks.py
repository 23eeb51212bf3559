"""Cache blocks as raw bytes: zero-copy views on the sending side, direct writes on the receiving side.

A layer cache is [num_blocks, block_size, kv_heads, head_dim]; one block's bytes are contiguous
in a contiguous cache, so a run of consecutive block ids is one slice of the cache's bytes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import torch


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
