"""A tensor-parallel prompt worker's KV transfers: each rank sends its own KV-head shard.

Rank 0 sends its shard as a worker without tensor parallelism does (`prompt.PromptService`); to
every other rank it sends messages (`LLMEngine.send_to_ranks`), handled there in order between the
batches:

- `OpenShard`: rank r opens a transfer of its shard to token rank r (the token worker's port + r),
  through the worker's own KV transport, and sends each layer as its prefill writes it (or, given
  the blocks, every layer at once: a serialized transfer).
- `AbortShard`: rank r aborts that transfer.

How each follower's transfer ended goes back to rank 0 through the tensor group's store
(`kv/<transfer number>/<rank>`), off every engine thread. Rank 0 answers Prefill only once every
rank's transfer was acknowledged (so the token worker holds every shard before Generate), and
frees the blocks only once no follower reads them any more.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import threading
from dataclasses import dataclass

import grpc

from phasesplit.engine.handoff import KVHandoff
from phasesplit.transport.base import TransferAborted, TransferError, TransferTimeout, error_from_status, status_of

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OpenShard:
    request_id: str
    addr: str  # the token worker (its rank 0)
    handoff: KVHandoff  # rank 0's
    number: int  # the transfer's number: where the rank reports how it ended
    block_ids: list[int] | None  # given: send every layer now (serialized); None: as the prefill writes them


@dataclass(frozen=True, slots=True)
class AbortShard:
    request_id: str


def shard_address(addr: str, rank: int) -> str:
    """Where token rank `rank` of the worker at `addr` (host:port, its rank 0) takes KV: port + rank."""
    host, port = addr.rsplit(":", 1)
    return f"{host}:{int(port) + rank}"


def _key(number: int, rank: int) -> str:
    return f"kv/{number}/{rank}"


class _Shard:
    """One follower transfer; `report` writes how it ended, once."""

    def __init__(self, sender, number: int, num_layers: int, num_blocks: int, held_blocks: int = 0):
        self.sender, self.number, self.num_layers, self.num_blocks = sender, number, num_layers, num_blocks
        self.held_blocks = held_blocks  # leading blocks the token rank holds already: each layer starts there
        self.blocks_sent: dict[int, int] = {}  # by layer: the blocks queued so far
        self._reported = False
        self._lock = threading.Lock()

    def claim_report(self) -> bool:
        with self._lock:
            first, self._reported = not self._reported, True
            return first


class ShardSenders:
    """A prompt worker's rank r > 0: its transfers, by request id."""

    def __init__(self, engine, transport):
        self.engine = engine
        self.tp = engine.tp
        self.transport = transport
        self._shards: dict[str, _Shard] = {}
        self._lock = threading.Lock()
        engine.layer_hook = self.on_layer

    def on_message(self, message) -> None:
        if isinstance(message, OpenShard):
            self.open(message)
        elif isinstance(message, AbortShard):
            self.abort(message.request_id)

    def open(self, message: OpenShard) -> None:
        handoff = message.handoff.for_rank(self.tp.rank)
        try:
            sender = self.transport.open(shard_address(message.addr, self.tp.rank), handoff.to_proto())
        except (ValueError, TransferError) as exc:
            self._report(message.number, exc)
            return
        shard = _Shard(sender, message.number, handoff.layout.num_layers, handoff.num_blocks,
                       handoff.num_cached_blocks)
        with self._lock:
            self._shards[message.request_id] = shard
        if message.block_ids is not None:
            first = shard.held_blocks
            for layer in range(shard.num_layers):
                self._send(message.request_id, shard, layer, first, message.block_ids[first:])

    def on_layer(self, layer: int, request_ids: list[str]) -> None:
        """The layer hook: this rank's prefill wrote `layer` of these requests."""
        for rid in request_ids:
            with self._lock:
                shard = self._shards.get(rid)
            if shard is None:
                continue
            first, block_ids = self.engine.prefill_piece(rid, shard.blocks_sent.get(layer, shard.held_blocks))
            if block_ids:  # (none: a chunk that ends inside the blocks the token rank holds)
                self._send(rid, shard, layer, first, block_ids)

    def abort(self, request_id: str) -> None:
        with self._lock:
            shard = self._shards.get(request_id)
        if shard is not None:  # abort() waits for the sender's thread: not on this rank's main thread
            threading.Thread(target=self._end, args=(request_id, shard, True), name=f"kv-shard-abort-{request_id}",
                             daemon=True).start()

    def pending(self) -> int:
        with self._lock:
            return len(self._shards)

    def _send(self, rid: str, shard: _Shard, layer: int, first: int, block_ids: list[int]) -> None:
        shard.sender.send_layer(layer, *self.engine.kv_layer(layer), block_ids, first)
        shard.blocks_sent[layer] = first + len(block_ids)
        if layer == shard.num_layers - 1 and first + len(block_ids) >= shard.num_blocks:
            threading.Thread(target=self._end, args=(rid, shard, False), name=f"kv-shard-{rid}", daemon=True).start()

    def _end(self, rid: str, shard: _Shard, abort: bool) -> None:
        result: TransferError | int
        try:
            if abort:
                shard.sender.abort()
                result = TransferAborted("transfer aborted by the prompt worker")
            else:
                result = shard.sender.finish().bytes
        except TransferError as exc:
            result = exc
        except Exception as exc:  # noqa: BLE001 - rank 0 must hear of it either way
            result = TransferError(f"rank {self.tp.rank}: {exc}")
        with self._lock:
            if self._shards.get(rid) is shard:
                del self._shards[rid]
        if shard.claim_report():
            self._report(shard.number, result)

    def _report(self, number: int, result: TransferError | int) -> None:
        if isinstance(result, TransferError):
            value = f"{status_of(result).name} {result}"
        else:
            value = f"OK {result}"
        self.tp.store.set(_key(number, self.tp.rank), value)


class ShardRun:
    """Rank 0's view of one request's follower transfers."""

    def __init__(self, tp, number: int):
        self.tp, self.number = tp, number
        self._lock = threading.Lock()
        self._result: TransferError | int | None = None

    def result(self, timeout: float) -> int:
        """The bytes every follower's token rank acknowledged; raises the first follower's TransferError.
        Waits at most `timeout` seconds for the followers' reports, once: later calls repeat the outcome."""
        with self._lock:
            if self._result is None:
                self._result = self._collect(timeout)
            if isinstance(self._result, TransferError):
                raise self._result
            return self._result

    def _collect(self, timeout: float) -> TransferError | int:
        store = self.tp.store
        keys = [_key(self.number, rank) for rank in range(1, self.tp.size)]
        try:
            store.wait(keys, datetime.timedelta(seconds=timeout))
        except Exception:  # noqa: BLE001 - the store raises its own error types on a timeout
            return TransferTimeout(f"a tensor-parallel rank's KV transfer did not end within {timeout:g} s")
        total, error = 0, None
        for key in keys:
            status, _, detail = store.get(key).decode().partition(" ")
            store.delete_key(key)
            if status == "OK":
                total += int(detail)
            elif error is None:
                error = error_from_status(grpc.StatusCode[status], detail)
        return error or total


class LeaderShards:
    """Prompt rank 0: opens and aborts the other ranks' transfers (through the engine thread)."""

    def __init__(self, core):
        self.core = core
        self.engine = core.engine
        self._numbers = itertools.count(1)

    def open(self, addr: str, handoff: KVHandoff, block_ids: list[int] | None = None) -> ShardRun:
        run = ShardRun(self.engine.tp, next(self._numbers))
        message = OpenShard(handoff.request_id, addr, handoff, run.number, block_ids)
        self.core.loop.run(self.engine.send_to_ranks, message)
        return run

    def abort(self, request_id: str, run: ShardRun, timeout: float) -> None:
        """Aborts the followers' transfers and waits (at most `timeout`) until none reads the blocks."""
        self.core.loop.run(self.engine.send_to_ranks, AbortShard(request_id))
        try:
            run.result(timeout)
        except TransferError:
            pass
