"""The KV transport interface: what a prompt worker sends through and what a token worker receives into.

Three implementations share it: `grpc_kv` (a client stream of chunks), `nccl_kv` (gRPC for the
handshake, tensors over a process group) and `tcp_kv` (gRPC for the handshake, bytes over a plain
socket). All are synchronous and thread based:

    sender = transport.open(token_worker_addr, header)   # header: phasesplit.v1.KVHeader
    sender.send_layer(layer, k, v, block_ids)            # engine thread, cheap; bounded queue
    sender.finish() -> TransferResult                    # waits for the token worker's ack
    sender.abort()

On the token worker a `KVSink` turns a header into a `KVDestination` whose `write` copies each
chunk straight into the paged cache. Errors are `TransferError` subclasses, each mapped onto one
gRPC status code by `STATUS` (both ways: `status_of`, `error_from_status`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
import torch

from phasesplit.transport.errors import (  # noqa: F401  (the contract's errors, re-exported)
    STATUS, CachedBlocksGone, CapacityError, KVDataLoss, LayoutMismatch, TransferAborted, TransferError,
    TransferTimeout, error_from_status, status_of,
)
from phasesplit.transport.layout import (  # noqa: F401  (re-exported)
    DTYPES, KVLayout, block_bytes, check_layout, validate_layout,
)
from phasesplit.v1 import worker_pb2 as pb

K, V = 0, 1  # KVChunk.kind
END = 2  # KVChunk.kind of a stream's last message (no data): the sender sent every chunk and finished


@dataclass(frozen=True, slots=True)
class TransferResult:
    bytes: int      # KV payload bytes acknowledged by the receiver
    seconds: float  # from open() to the acknowledgement


class KVSender(Protocol):
    def send_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                   block_ids: list[int] | None = None, first: int = 0) -> None:
        """Queue one layer's K and V. k, v: [n_blocks, block_size, kv_heads, head_dim], the
        sequence's blocks in order; or, with `block_ids`, whole layer caches [num_blocks, ...]
        from which blocks `block_ids` are sent in that order, as the sequence's blocks from
        position `first` on (a chunked prefill sends each layer in pieces, in order: each piece
        starts where the layer's last one ended). With header.num_cached_blocks = c the receiver
        holds blocks [0, c) already: each layer starts at position c. The tensors are read later, by the
        sender's thread: leave those blocks untouched until finish() or abort() returns.
        Blocks while the queue is full (backpressure). Never raises for a failed transfer:
        finish() reports it."""

    def finish(self) -> TransferResult:
        """Wait until the receiver holds every block; raises a TransferError otherwise."""

    def abort(self) -> None:
        """Stop sending; the receiver frees what it reserved. Idempotent."""


class KVTransport(Protocol):
    name: str

    def open(self, addr: str, header: pb.KVHeader) -> KVSender: ...

    def close(self) -> None: ...


class KVDestination(Protocol):
    """Blocks reserved for one transfer. Block positions count in the sequence's block table; every
    write raises a TransferError once the destination was aborted (see blocks.CacheDestination)."""

    def write(self, layer: int, kind: int, block_start: int, block_count: int, data: memoryview) -> None:
        """Copy blocks [block_start, block_start + block_count) of `layer`'s K (kind 0) or V (kind 1)
        from `data`, raw bytes of [block_count, block_size, kv_heads, head_dim] in the layout's dtype."""

    def write_tensor(self, layer: int, kind: int, block_start: int, src: torch.Tensor) -> None:
        """Like write, from a tensor [block_count, block_size, kv_heads, head_dim] on any device
        (no host copy when it is on the cache's device)."""

    def receive(self, layer: int, kind: int, block_start: int, block_count: int,
                fill: Callable[[list[memoryview]], None]) -> None:
        """Like write, but `fill` writes the bytes itself into the writable views it is given, in
        order (straight into a CPU cache's blocks: a socket's recv_into)."""

    def commit(self) -> None:
        """Every block arrived and was verified: make the KV ready for Generate."""

    def abort(self) -> None:
        """Free everything reserved by begin(). Idempotent."""


class KVSink(Protocol):
    def begin(self, header: pb.KVHeader) -> KVDestination:
        """Check the layout (raise LayoutMismatch, see check_layout) and reserve blocks for
        header.prompt_token_ids (raise CapacityError when they do not fit). The first
        header.num_cached_blocks of them are the receiver's own cached blocks, shared (raise
        CachedBlocksGone when it no longer holds them all); writes go to the others."""


class KVReceiver(Protocol):
    """A backend's receiving side on a token worker: the services it adds to the worker's server."""

    def add_to_server(self, server: grpc.Server) -> None: ...

    def close(self) -> None: ...


def check_header(header: pb.KVHeader) -> None:
    """Raise ValueError naming the first field of a KVHeader that no transfer could carry."""
    validate_layout(header.layout)
    if not header.request_id:
        raise ValueError("header.request_id must not be empty")
    if not header.prompt_token_ids:
        raise ValueError("header.prompt_token_ids must not be empty")
    most = max_cached_blocks(len(header.prompt_token_ids), header.layout.block_size)
    if header.num_cached_blocks > most:
        raise ValueError(f"header.num_cached_blocks must be in [0, {most}] (the prompt's full blocks short of "
                         f"its last token's), got {header.num_cached_blocks}")


@dataclass(frozen=True, slots=True)
class LayerShape:
    """What send_layer takes for one header: see `check`."""

    num_layers: int
    num_blocks: int  # the prompt's blocks
    block_shape: tuple[int, int, int]
    dtype: torch.dtype
    first_block: int = 0  # the leading blocks the receiver holds already: each layer sends [first_block, num_blocks)

    @classmethod
    def of(cls, header: pb.KVHeader) -> LayerShape:
        layout = header.layout
        return cls(layout.num_layers, num_prompt_blocks(header),
                   (layout.block_size, layout.num_kv_heads, layout.head_dim), DTYPES[layout.dtype],
                   header.num_cached_blocks)

    @property
    def blocks_to_send(self) -> int:
        """What each layer's K and V carry."""
        return self.num_blocks - self.first_block

    def check(self, layer: int, k: torch.Tensor, v: torch.Tensor, block_ids: Sequence[int] | None,
              sent: list[int], device: torch.device | None = None, first: int = 0) -> list[int]:
        """The block ids to send for send_layer's arguments; ValueError naming the argument that is
        wrong. `sent`: how many blocks of each layer were sent before (see `Progress`)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        if sent[layer] == self.num_blocks:
            raise ValueError(f"layer {layer} was already sent")
        if first != sent[layer]:
            raise ValueError(f"first must be {sent[layer]} (where layer {layer}'s last piece ended), got {first}")
        for name, t in (("k", k), ("v", v)):
            if t.dtype != self.dtype or t.dim() != 4 or tuple(t.shape[1:]) != self.block_shape:
                raise ValueError(f"{name} must be {self.dtype} [blocks, {', '.join(map(str, self.block_shape))}]"
                                 f", got {t.dtype} {list(t.shape)}")
            if device is not None and t.device.type != device.type:
                raise ValueError(f"{name} must be on {device} (the transport's device), got {t.device}")
        if k.shape[0] != v.shape[0]:
            raise ValueError(f"k and v must hold the same blocks, got {k.shape[0]} and {v.shape[0]}")
        if block_ids is None:  # the whole sequence's blocks: those from first_block on are sent
            if k.shape[0] < self.num_blocks:
                raise ValueError(f"k holds {k.shape[0]} blocks, the prompt needs {self.num_blocks}")
            return list(range(first, self.num_blocks))
        ids = [int(i) for i in block_ids[:self.num_blocks - first]]
        if not ids:
            raise ValueError("block_ids must not be empty")
        if min(ids) < 0 or max(ids) >= k.shape[0]:
            raise ValueError(f"block_ids must be in [0, {k.shape[0]}), got {ids}")
        return ids


class Progress:
    """How many blocks of each layer a sender has queued (pieces arrive in order), counting the leading
    blocks the receiver holds already as sent."""

    def __init__(self, shape: LayerShape):
        self.shape = shape
        self.sent = [shape.first_block] * shape.num_layers

    def add(self, layer: int, num_blocks: int) -> None:
        self.sent[layer] += num_blocks

    def missing(self) -> list[int]:
        """Layers not every block of which was queued."""
        return [layer for layer, n in enumerate(self.sent) if n < self.shape.num_blocks]


def num_prompt_blocks(header: pb.KVHeader) -> int:
    """Blocks holding the prompt's KV; a transfer moves those from `header.num_cached_blocks` on."""
    return math.ceil(len(header.prompt_token_ids) / header.layout.block_size)


def max_cached_blocks(num_tokens: int, block_size: int) -> int:
    """The most leading blocks of a prompt a token worker may hold instead of receiving: its full blocks
    short of the one holding its last token (as the prefix cache looks prompts up)."""
    return max(0, (num_tokens - 1) // block_size)
