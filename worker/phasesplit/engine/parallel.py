"""Tensor parallelism in the Megatron layout: which slice of each weight a rank holds, and the
collectives between ranks.

Column-parallel: q/k/v (attention heads and KV heads split across ranks; with fewer KV heads than
ranks each KV head is replicated on `size / num_kv_heads` ranks) and gate/up (the intermediate
dimension split). Row-parallel: o and down (their input dimension split; partial sums all-reduced,
the bias added once after). The embedding is replicated (a lookup needs no communication); the LM
head is split by vocabulary, the largest single matmul of a decode step, and its logits gathered
on rank 0, which alone samples.
"""

from __future__ import annotations

import dataclasses
import datetime

import torch
import torch.distributed as dist
from torch import Tensor

from phasesplit.engine.config import ModelConfig

# Followers wait on rank 0's next command for as long as the worker is idle.
CONTROL_TIMEOUT = datetime.timedelta(days=365)


@dataclasses.dataclass(frozen=True, slots=True)
class TensorParallel:
    """This process's place in a tensor-parallel group; size 1 (the default) is a single device."""

    rank: int = 0
    size: int = 1
    group: object = None  # the data-plane group (NCCL on CUDA, gloo on CPU); None: the default group
    control: object = None  # a gloo group for rank 0's commands to the others
    store: object = None  # the group's key-value store: what a rank reports to rank 0 off the engine thread

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: Tensor) -> Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def gather_to_leader(self, x: Tensor) -> list[Tensor] | None:
        """Every rank's equally shaped `x`, on rank 0 (None elsewhere)."""
        if self.size == 1:
            return [x]
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.is_leader else None
        dist.gather(x.contiguous(), parts, dst=0, group=self.group)
        return parts

    def min_over_ranks(self, value: int) -> int:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (small Python objects: schedules and commands)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]


def init_tensor_parallel(rank: int, size: int, master: str, device: torch.device | str) -> TensorParallel:
    """Joins the group of `size` ranks that meet at `master` (`host:port`, rank 0 listens there)."""
    if size == 1:
        return TensorParallel()
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    host, port = master.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), size, rank == 0, CONTROL_TIMEOUT)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return TensorParallel(rank, size, None, control, dist.PrefixStore("phasesplit/", store))


def check_tensor_parallel(config: ModelConfig, size: int) -> None:
    """Raise ValueError naming the model field that `size` ranks cannot split evenly."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size: got {size!r}, must be an integer >= 1")
    if config.num_heads % size:
        raise ValueError(f"tensor_parallel_size: {size} must divide num_attention_heads ({config.num_heads})")
    if config.intermediate_size % size:
        raise ValueError(f"tensor_parallel_size: {size} must divide intermediate_size ({config.intermediate_size})")
    kv = config.num_kv_heads
    if (kv >= size and kv % size) or (kv < size and size % kv):
        raise ValueError(f"tensor_parallel_size: {size} must divide num_key_value_heads ({kv}) or be a multiple of it")


@dataclasses.dataclass(frozen=True, slots=True)
class Shard:
    """The head, KV-head, intermediate and vocabulary ranges one rank holds."""

    heads: range
    kv_heads: range
    intermediate: range
    vocab: range
    vocab_per_rank: int  # every rank's logits are padded to this width before the gather

    @classmethod
    def of(cls, config: ModelConfig, tp: TensorParallel) -> Shard:
        check_tensor_parallel(config, tp.size)
        r, n = tp.rank, tp.size
        h = config.num_heads // n
        kv = config.num_kv_heads
        kv_heads = range(r * kv // n, r * kv // n + kv // n) if kv >= n else range(r * kv // n, r * kv // n + 1)
        i = config.intermediate_size // n
        v = -(-config.vocab_size // n)
        return cls(range(r * h, (r + 1) * h), kv_heads, range(r * i, (r + 1) * i),
                   range(min(r * v, config.vocab_size), min((r + 1) * v, config.vocab_size)), v)

    def weight_slice(self, name: str, head_dim: int) -> tuple[int, range] | None:
        """(dimension, range) of the checkpoint tensor `name` that this rank holds; None: all of it."""
        kind = name.rsplit(".", 2)[-2:]
        module, param = kind if len(kind) == 2 else ("", kind[0])
        heads = lambda r: range(r.start * head_dim, r.stop * head_dim)  # noqa: E731
        if module == "q_proj":
            return 0, heads(self.heads)
        if module in ("k_proj", "v_proj"):
            return 0, heads(self.kv_heads)
        if module == "o_proj" and param == "weight":
            return 1, heads(self.heads)
        if module in ("gate_proj", "up_proj"):
            return 0, self.intermediate
        if module == "down_proj":
            return 1, self.intermediate
        if module == "lm_head":
            return 0, self.vocab
        return None
