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

from phasesplit.v1 import worker_pb2 as pb

K, V = 0, 1  # KVChunk.kind
END = 2  # KVChunk.kind of a stream's last message (no data): the sender sent every chunk and finished

LAYOUT_FIELDS = ("model", "dtype", "num_layers", "num_kv_heads", "head_dim", "block_size",
                 "tensor_parallel_size", "tensor_parallel_rank")
# What a layout without tensor parallelism (or from a sender that predates it) holds.
_TP_DEFAULTS = {"tensor_parallel_size": 1, "tensor_parallel_rank": 0}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TransferError(RuntimeError):
    """A KV transfer failed; the destination was (or must be) freed."""


class LayoutMismatch(TransferError):
    """The two workers' KV layouts differ; `fields` maps each differing field to (ours, theirs)."""

    def __init__(self, fields: dict[str, tuple[object, object]] | None = None, message: str | None = None):
        self.fields = dict(fields or {})
        if message is None:
            diffs = ", ".join(f"{name}: {ours!r} here, {theirs!r} from the sender"
                              for name, (ours, theirs) in self.fields.items())
            message = f"KV layout mismatch ({diffs})"
            if "tensor_parallel_size" in self.fields:
                ours, theirs = self.fields["tensor_parallel_size"]
                message += (f": this token worker has tensor-parallel size {ours}, the prompt worker {theirs}; "
                            "KV moves rank to rank, so both pools need the same tensorParallelSize")
        super().__init__(message)


class CapacityError(TransferError):
    """The token worker cannot hold the KV (not enough free blocks, or draining)."""


class KVDataLoss(TransferError):
    """A chunk failed its checksum, or the stream ended before every block arrived."""


class TransferTimeout(TransferError):
    """No progress within the transfer timeout."""


class TransferAborted(TransferError):
    """The transfer was aborted by the sender or the receiver."""


# Each error as the gRPC status that carries it (token worker -> prompt worker -> router); the first
# match wins, so a subclass comes before its base. A plain TransferError (peer unreachable, a
# request this token worker cannot take) is UNAVAILABLE: another token worker may take it.
STATUS = (
    (LayoutMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (KVDataLoss, grpc.StatusCode.DATA_LOSS),
    (TransferTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (TransferAborted, grpc.StatusCode.ABORTED),
    (TransferError, grpc.StatusCode.UNAVAILABLE),
)
_ERROR_OF = {code: kind for kind, code in reversed(STATUS)} | {grpc.StatusCode.CANCELLED: TransferAborted}


def status_of(exc: TransferError) -> grpc.StatusCode:
    """The status a TransferError is sent as."""
    return next(code for kind, code in STATUS if isinstance(exc, kind))


def error_from_status(code: grpc.StatusCode, details: str) -> TransferError:
    """The TransferError a token worker's status stands for (a status not in STATUS: a plain one)."""
    kind = _ERROR_OF.get(code, TransferError)
    message = f"token worker refused the KV ({code.name}): {details}"
    return kind(message=message) if kind is LayoutMismatch else kind(message)


@dataclass(frozen=True, slots=True)
class TransferResult:
    bytes: int      # KV payload bytes acknowledged by the receiver
    seconds: float  # from open() to the acknowledgement


class KVSender(Protocol):
    def send_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                   block_ids: list[int] | None = None) -> None:
        """Queue one layer's K and V. k, v: [n_blocks, block_size, kv_heads, head_dim], the
        sequence's blocks in order; or, with `block_ids`, whole layer caches [num_blocks, ...]
        from which blocks `block_ids` are sent in that order. The tensors are read later, by the
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
        header.prompt_token_ids (raise CapacityError when they do not fit)."""


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


@dataclass(frozen=True, slots=True)
class LayerShape:
    """What send_layer takes for one header: see `check`."""

    num_layers: int
    num_blocks: int  # the prompt's blocks: what each layer's K and V carry
    block_shape: tuple[int, int, int]
    dtype: torch.dtype

    @classmethod
    def of(cls, header: pb.KVHeader) -> LayerShape:
        layout = header.layout
        return cls(layout.num_layers, num_prompt_blocks(header),
                   (layout.block_size, layout.num_kv_heads, layout.head_dim), DTYPES[layout.dtype])

    def check(self, layer: int, k: torch.Tensor, v: torch.Tensor, block_ids: Sequence[int] | None,
              sent: set[int], device: torch.device | None = None) -> list[int]:
        """The block ids to send for send_layer's arguments; ValueError naming the argument that is wrong."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        if layer in sent:
            raise ValueError(f"layer {layer} was already sent")
        for name, t in (("k", k), ("v", v)):
            if t.dtype != self.dtype or t.dim() != 4 or tuple(t.shape[1:]) != self.block_shape:
                raise ValueError(f"{name} must be {self.dtype} [blocks, {', '.join(map(str, self.block_shape))}]"
                                 f", got {t.dtype} {list(t.shape)}")
            if device is not None and t.device.type != device.type:
                raise ValueError(f"{name} must be on {device} (the transport's device), got {t.device}")
        if k.shape[0] != v.shape[0]:
            raise ValueError(f"k and v must hold the same blocks, got {k.shape[0]} and {v.shape[0]}")
        if block_ids is None:
            if k.shape[0] < self.num_blocks:
                raise ValueError(f"k holds {k.shape[0]} blocks, the prompt needs {self.num_blocks}")
            return list(range(self.num_blocks))
        ids = [int(i) for i in block_ids[:self.num_blocks]]
        if len(ids) < self.num_blocks:
            raise ValueError(f"block_ids has {len(ids)} ids, the prompt needs {self.num_blocks}")
        if min(ids) < 0 or max(ids) >= k.shape[0]:
            raise ValueError(f"block_ids must be in [0, {k.shape[0]}), got {ids}")
        return ids


def layout_to_proto(layout) -> pb.KVLayout:
    """Any object with the layout fields (the engine's KVLayout, a dict, a KVLayout message)."""
    if isinstance(layout, pb.KVLayout):
        return layout
    get = (lambda name: layout.get(name, _TP_DEFAULTS.get(name))) if isinstance(layout, dict) \
        else lambda name: getattr(layout, name, _TP_DEFAULTS.get(name))
    return pb.KVLayout(**{name: get(name) for name in LAYOUT_FIELDS})


def layout_fingerprint(layout) -> tuple:
    """The fields two workers must agree on, as a comparable tuple (an unset tensor_parallel_size is 1)."""
    msg = layout_to_proto(layout)
    return tuple(getattr(msg, name) or _TP_DEFAULTS.get(name, getattr(msg, name)) for name in LAYOUT_FIELDS)


def check_layout(ours, theirs) -> None:
    """Raise LayoutMismatch naming every field where `theirs` (the sender's) differs from `ours`."""
    fields = {name: (a, b) for name, a, b in zip(LAYOUT_FIELDS, layout_fingerprint(ours), layout_fingerprint(theirs))
              if a != b}
    if fields:
        raise LayoutMismatch(fields)


def validate_layout(layout: pb.KVLayout) -> None:
    """Raise ValueError naming the first field of a KVLayout that no worker could hold."""
    if layout.dtype not in DTYPES:
        raise ValueError(f"layout.dtype must be one of {sorted(DTYPES)}, got {layout.dtype!r}")
    for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
        if getattr(layout, name) < 1:
            raise ValueError(f"layout.{name} must be >= 1, got {getattr(layout, name)}")


def block_bytes(layout: pb.KVLayout) -> int:
    """Bytes of one block of one layer's K (or V)."""
    itemsize = DTYPES[layout.dtype].itemsize
    return layout.block_size * layout.num_kv_heads * layout.head_dim * itemsize


def num_prompt_blocks(header: pb.KVHeader) -> int:
    """Blocks holding the prompt's KV: what a transfer moves for each layer's K and V."""
    return math.ceil(len(header.prompt_token_ids) / header.layout.block_size)
