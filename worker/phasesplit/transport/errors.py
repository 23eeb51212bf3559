"""Why a KV transfer failed, and the gRPC status each reason travels as (token worker -> prompt worker -> router)."""

from __future__ import annotations

import grpc


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


class CachedBlocksGone(TransferError):
    """The header counts on leading blocks the token worker's prefix cache no longer holds (evicted):
    send the request again with num_cached_blocks = 0."""


class KVDataLoss(TransferError):
    """A chunk failed its checksum, or the stream ended before every block arrived."""


class TransferTimeout(TransferError):
    """No progress within the transfer timeout."""


class TransferAborted(TransferError):
    """The transfer was aborted by the sender or the receiver."""


# Each error as the gRPC status that carries it; the first match wins, so a subclass comes before
# its base. A plain TransferError (peer unreachable, a request this token worker cannot take) is
# UNAVAILABLE: another token worker may take it.
STATUS = (
    (LayoutMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (CachedBlocksGone, grpc.StatusCode.NOT_FOUND),
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
