"""A tensor-parallel token worker's other ranks: each takes its own KV-head shard of a transfer.

Prompt rank r sends its shard to token rank r (on the worker's port + r, see `follower`). Blocks
are rank 0's to give: its inbox reserves them and tells every rank with messages
(`LLMEngine.send_to_ranks`), which each rank handles in order between the batches rank 0 broadcasts:

- `ExpectShard(rid, blocks)`: a transfer for `rid` writes into `blocks` (it may arrive before or
  after this; `ShardInbox.begin` waits for it).
- `ForgetShard(rid)`: rank 0 freed the blocks, or refused the request: writes for it are refused
  from now on. A write under way finishes first (the destination's lock), so no block is written
  after rank 0 hands it to another request: that request's batches come after this message.
- `ClaimShard(rid)`: Generate takes the KV; every rank votes whether its shard is complete, and
  rank 0 (which votes yes: it claimed its own) learns whether all of them are (a collective).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from phasesplit.roles.tombstones import Tombstones
from phasesplit.transport import base, blocks
from phasesplit.v1 import worker_pb2 as pb

RECEIVING, COMMITTED, CLOSED = "receiving", "committed", "closed"


@dataclass(frozen=True, slots=True)
class ExpectShard:
    request_id: str
    block_ids: list[int]


@dataclass(frozen=True, slots=True)
class ForgetShard:
    request_id: str


@dataclass(frozen=True, slots=True)
class ClaimShard:
    request_id: str


def claim_on_every_rank(engine, request_id: str) -> bool:
    """Rank 0, on its engine thread, once it claimed its own KV: whether every other rank holds its
    complete shard (they stop taking writes for it either way)."""
    engine.send_to_ranks(ClaimShard(request_id))
    return engine.tp.min_over_ranks(1) == 1


class ShardKV(blocks.CacheDestination):
    """One request's shard arriving into the blocks rank 0 reserved for it. It never frees them:
    rank 0 does, after `ForgetShard` closed this destination."""

    def __init__(self, engine, request_id: str, block_ids: list[int]):
        self.engine = engine
        self.request_id = request_id
        self.block_ids = block_ids
        self.state = RECEIVING
        self.why = ""
        self.lock = threading.Lock()

    def cache(self, layer: int, kind: int) -> torch.Tensor:
        if self.state != RECEIVING:
            raise base.TransferAborted(f"request {self.request_id}: shard is {self.state}: {self.why}")
        k, v = self.engine.kv_layer(layer)
        return k if kind == base.K else v

    def commit(self) -> None:
        with self.lock:
            if self.state != RECEIVING:
                raise base.TransferAborted(f"request {self.request_id}: shard is {self.state}: {self.why}")
            self.state = COMMITTED

    def abort(self) -> None:
        self.close("the transfer ended before every block arrived")

    def close(self, why: str) -> bool:
        """Refuses every later write; True when the shard had been committed."""
        with self.lock:
            committed = self.state == COMMITTED
            if self.state != CLOSED:
                self.state, self.why = CLOSED, why
        return committed


class ShardInbox(base.KVSink):
    """A token worker's rank r > 0: the KVSink its transport receivers write into."""

    def __init__(self, engine, timeout: float, lease: float):
        self.engine = engine
        self.timeout = timeout
        self._expected: dict[str, list[int]] = {}
        self._entries: dict[str, ShardKV] = {}
        self._refused = Tombstones(lease)
        self._changed = threading.Condition()

    # ---- KVSink (transport threads) ----

    def begin(self, header: pb.KVHeader) -> ShardKV:
        base.check_layout(self.engine.layout, header.layout)
        rid = header.request_id
        with self._changed:
            if not self._changed.wait_for(lambda: rid in self._expected or rid in self._refused, self.timeout):
                raise base.TransferTimeout(f"request {rid}: rank 0 of this token worker reserved no blocks for it "
                                           f"within {self.timeout:g} s")
            blocks_ = self._expected.get(rid)
            if blocks_ is None:
                raise base.TransferAborted(f"request {rid}: refused or freed by rank 0 of this token worker")
            if rid in self._entries:
                raise base.TransferError(f"request {rid}: its shard is already arriving on this rank")
            if len(blocks_) != base.num_prompt_blocks(header):
                raise base.TransferError(f"request {rid}: {base.num_prompt_blocks(header)} blocks announced, "
                                         f"rank 0 reserved {len(blocks_)}")
            entry = self._entries[rid] = ShardKV(self.engine, rid, blocks_)
        return entry

    # ---- rank 0's messages (this rank's main thread) ----

    def on_message(self, message) -> None:
        if isinstance(message, ExpectShard):
            self.expect(message.request_id, message.block_ids)
        elif isinstance(message, ForgetShard):
            self.forget(message.request_id)
        elif isinstance(message, ClaimShard):
            self.vote(message.request_id)

    def expect(self, request_id: str, block_ids: list[int]) -> None:
        with self._changed:
            self._expected[request_id] = list(block_ids)
            self._changed.notify_all()

    def forget(self, request_id: str) -> None:
        with self._changed:
            self._expected.pop(request_id, None)
            entry = self._entries.pop(request_id, None)
            self._refused.add(request_id)
            self._changed.notify_all()
        if entry is not None:
            entry.close("freed by rank 0")

    def claim(self, request_id: str) -> bool:
        """True when this rank's shard of the request is complete; either way it is no longer tracked."""
        with self._changed:
            self._expected.pop(request_id, None)
            entry = self._entries.pop(request_id, None)
        return entry is not None and entry.close("claimed by Generate")

    def vote(self, request_id: str) -> None:
        """This rank's part of `claim_on_every_rank`: the collective runs whatever the claim found."""
        try:
            complete = self.claim(request_id)
        except Exception:  # noqa: BLE001 - every rank must join the collective
            complete = False
        self.engine.tp.min_over_ranks(int(complete))

    def pending(self) -> int:
        with self._changed:
            return len(self._expected)
