"""A tensor-parallel token worker's other ranks: each takes its own KV-head shard of a transfer.

Prompt rank r sends its shard to token rank r (on the worker's port + r, see `follower`). Blocks
are rank 0's to give: its inbox reserves them and tells every rank with commands, which each rank
runs in order between the batches rank 0 broadcasts:

- `expect_shard(rid, blocks)`: a transfer for `rid` writes into `blocks` (it may arrive before or
  after this; `ShardInbox.begin` waits for it).
- `forget_shard(rid)`: rank 0 freed the blocks, or refused the request: writes for it are refused
  from now on. A write under way finishes first (the destination's lock), so no block is written
  after rank 0 hands it to another request: that request's batches come after this command.
- `claim_shard(rid)`: Generate takes the KV; every rank reports whether its shard is complete, and
  rank 0 learns whether all of them are (a collective inside the command).

Rank 0 itself runs these commands too, as no-ops: it has no `ShardInbox`.
"""

from __future__ import annotations

import threading

import torch

from phasesplit.roles.tombstones import Tombstones
from phasesplit.transport import base, blocks
from phasesplit.v1 import worker_pb2 as pb

STATE = "shard_inbox"  # the key of a rank's ShardInbox in its runner's state
RECEIVING, COMMITTED, CLOSED = "receiving", "committed", "closed"


class ShardKV(blocks.CacheDestination):
    """One request's shard arriving into the blocks rank 0 reserved for it. It never frees them:
    rank 0 does, after `forget_shard` closed this destination."""

    def __init__(self, cache, request_id: str, block_ids: list[int]):
        self.kv_cache = cache
        self.request_id = request_id
        self.block_ids = block_ids
        self.state = RECEIVING
        self.why = ""
        self.lock = threading.Lock()

    def cache(self, layer: int, kind: int) -> torch.Tensor:
        if self.state != RECEIVING:
            raise base.TransferAborted(f"request {self.request_id}: shard is {self.state}: {self.why}")
        return self.kv_cache.k[layer] if kind == base.K else self.kv_cache.v[layer]

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
            entry = self._entries[rid] = ShardKV(self.engine.kv_cache, rid, blocks_)
        return entry

    # ---- rank 0's commands (this rank's main thread) ----

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

    def pending(self) -> int:
        with self._changed:
            return len(self._expected)


def expect_shard(runner, request_id: str, block_ids: list[int]) -> None:
    if (inbox := runner.state.get(STATE)) is not None:
        inbox.expect(request_id, block_ids)


def forget_shard(runner, request_id: str) -> None:
    if (inbox := runner.state.get(STATE)) is not None:
        inbox.forget(request_id)


def claim_shard(runner, request_id: str) -> bool:
    """On every rank: whether every rank holds its complete shard (rank 0's own is, when it claims)."""
    inbox = runner.state.get(STATE)
    try:
        complete = inbox is None or inbox.claim(request_id)
    except Exception:  # noqa: BLE001 - the collective below must run on every rank regardless
        complete = False
    return runner.tp.min_over_ranks(int(complete)) == 1
