"""The KV layout two workers must agree on before blocks move between them, and the dtype names it uses.

The engine's KV cache is laid out by a `KVLayout`; a `KVHeader` carries it as the `KVLayout` message
(`to_proto`, `from_proto`), and the token side compares the two field by field (`check`).
"""

from __future__ import annotations

import dataclasses

import torch

from phasesplit.transport.errors import LayoutMismatch
from phasesplit.v1 import worker_pb2 as pb

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The name a layout gives `dtype` (KeyError for a dtype no KV cache holds)."""
    return _DTYPE_NAMES[dtype]


@dataclasses.dataclass(frozen=True, slots=True)
class KVLayout:
    """Per tensor-parallel rank: `num_kv_heads` is what one rank's cache holds."""

    model: str
    dtype: str          # a key of DTYPES
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int     # tokens per block
    tensor_parallel_size: int = 1
    tensor_parallel_rank: int = 0

    @classmethod
    def from_proto(cls, message: pb.KVLayout) -> KVLayout:
        """An unset tensor_parallel_size (a sender that predates it) is 1."""
        values = {f.name: getattr(message, f.name) for f in dataclasses.fields(cls)}
        return cls(**values | {"tensor_parallel_size": message.tensor_parallel_size or 1})

    def to_proto(self) -> pb.KVLayout:
        return pb.KVLayout(**dataclasses.asdict(self))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer's K (or V)."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.torch_dtype.itemsize

    def mismatches(self, theirs: KVLayout) -> dict[str, tuple[object, object]]:
        """Each field where `theirs` differs: name -> (ours, theirs)."""
        return {f.name: (getattr(self, f.name), getattr(theirs, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(theirs, f.name)}

    def differences(self, other: KVLayout) -> list[str]:
        """Names and values of the fields that differ, e.g. `["head_dim: 64 != 128"]`."""
        return [f"{name}: {ours!r} != {theirs!r}" for name, (ours, theirs) in self.mismatches(other).items()]

    def check(self, theirs: KVLayout) -> None:
        """Raise LayoutMismatch naming every field where `theirs` (the sender's) differs from ours."""
        if fields := self.mismatches(theirs):
            raise LayoutMismatch(fields)


def as_layout(layout: KVLayout | pb.KVLayout) -> KVLayout:
    """A layout as the engine holds it or as a header carries it."""
    return layout if isinstance(layout, KVLayout) else KVLayout.from_proto(layout)


def check_layout(ours: KVLayout | pb.KVLayout, theirs: KVLayout | pb.KVLayout) -> None:
    """Raise LayoutMismatch naming every field where `theirs` (the sender's) differs from `ours`."""
    as_layout(ours).check(as_layout(theirs))


def validate_layout(layout: pb.KVLayout) -> None:
    """Raise ValueError naming the first field of a KVLayout that no worker could hold."""
    if layout.dtype not in DTYPES:
        raise ValueError(f"layout.dtype must be one of {sorted(DTYPES)}, got {layout.dtype!r}")
    for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
        if getattr(layout, name) < 1:
            raise ValueError(f"layout.{name} must be >= 1, got {getattr(layout, name)}")


def block_bytes(layout: KVLayout | pb.KVLayout) -> int:
    """Bytes of one block of one layer's K (or V)."""
    return as_layout(layout).block_bytes
