"""The token worker's side of a KV transfer: the transport's `KVSink` over the engine's paged cache.

A transfer reserves blocks (engine thread), then the transport writes each verified chunk straight
into those blocks (transport thread: the engine never touches reserved blocks), then commits.
Generate claims committed KV and hands its blocks to the engine (`add_prefilled`). KV that is not
claimed within the lease, and transfers that stall past the transfer timeout, are freed.

An abort frees the request's KV in whatever state it is (receiving, ready) and leaves a tombstone
for the lease's length: KV that arrives for the request afterwards (its transfer was still on the
way when the abort came) is refused instead of held.

Reservations no data has reached yet are freed after the transfer timeout, and held per caller (its
credential and host): when a reservation does not fit, those of other callers beyond half the cache
are freed to make room (newest first). A flood of header-only streams from one caller thus cannot
keep the cache from another; one caller's own transfers are never cut short this way."""

from __future__ import annotations

import logging
import threading
import time

import torch

from phasesplit import auth
from phasesplit.engine.block_manager import CachedPrefixGone
from phasesplit.engine.engine import KVCapacityError
from phasesplit.engine.handoff import KVHandoff
from phasesplit.roles.core import WorkerCore
from phasesplit.roles.shard_receive import ExpectShard, ForgetShard, claim_on_every_rank
from phasesplit.roles.tombstones import Tombstones
from phasesplit.transport import base, blocks
from phasesplit.v1 import worker_pb2 as pb

log = logging.getLogger(__name__)

RECEIVING, READY, CLAIMED, FAILED = "receiving", "ready", "claimed", "failed"


class ReceivedKV(blocks.CacheDestination):
    """One request's KV (`kv`: what the header announced; `block_ids`: the blocks reserved for it)
    arriving into, or held in, the cache."""

    def __init__(self, inbox: KVInbox, header: pb.KVHeader, block_ids: list[int], caller: auth.Caller | None = None):
        self.inbox = inbox
        self.caller = caller
        self.data_arrived = False
        self.kv = KVHandoff.from_proto(header)
        self.request_id = header.request_id
        self.block_ids = block_ids
        self.state = RECEIVING
        self.error = ""
        self.touched = time.monotonic()
        self.lock = threading.Lock()  # a write and the release of its blocks never overlap
        self.settled = threading.Event()  # READY or FAILED

    def cache(self, layer: int, kind: int) -> torch.Tensor:
        if self.state != RECEIVING:
            raise base.TransferAborted(f"request {self.request_id}: transfer is {self.state}: {self.error}")
        k, v = self.inbox.engine.kv_layer(layer)
        return k if kind == base.K else v

    def written(self) -> None:
        self.data_arrived = True
        self.touched = time.monotonic()

    def commit(self) -> None:
        with self.lock:
            if self.state != RECEIVING:
                raise base.TransferAborted(f"request {self.request_id}: transfer is {self.state}: {self.error}")
            self.state = READY
            self.touched = time.monotonic()
        self.settled.set()

    def abort(self, error: str = "the transfer ended before every block arrived") -> None:
        self.fail(error)

    def fail(self, error: str, release=None) -> bool:
        """Frees the blocks unless Generate already owns them (by `release`, on the engine thread). True
        when this call freed them."""
        with self.lock:
            if self.state in (CLAIMED, FAILED):
                return False
            self.state, self.error = FAILED, error
            (release or self.inbox.release_blocks)(self.request_id)
            self.touched = time.monotonic()
        self.settled.set()
        return True

    def claim(self) -> bool:
        with self.lock:
            if self.state != READY:
                return False
            self.state = CLAIMED
            return True


class KVInbox(base.KVSink):
    WAITING_SHARE = 0.5  # of the cache: what one caller's reservations without data may hold

    def __init__(self, core: WorkerCore, transfer_timeout: float, lease: float, reap_interval: float = 0.5):
        self.core = core
        self.engine = core.engine
        self.transfer_timeout = transfer_timeout
        self.lease = lease
        self._entries: dict[str, ReceivedKV] = {}
        self._aborted = Tombstones(lease)
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_forever, args=(reap_interval,), name="kv-reaper",
                                        daemon=True)

    def start(self) -> KVInbox:
        self._reaper.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    # ---- KVSink (transport threads) ----

    def begin(self, header: pb.KVHeader) -> ReceivedKV:
        base.check_layout(self.engine.layout, header.layout)
        caller = auth.current_caller()
        try:
            return self.core.loop.run(self._reserve, header, caller)
        except KVCapacityError as exc:
            raise base.CapacityError(f"request {header.request_id}: {exc}") from exc
        except CachedPrefixGone as exc:
            raise base.CachedBlocksGone(f"request {header.request_id}: the header counts on "
                                        f"{header.num_cached_blocks} blocks of this token worker's prefix cache: "
                                        f"{exc}; send it again with num_cached_blocks 0") from exc
        except ValueError as exc:
            raise base.TransferError(f"request {header.request_id}: {exc}") from exc

    def _reserve(self, header: pb.KVHeader, caller: auth.Caller | None = None) -> ReceivedKV:
        """Engine thread. The tombstone check, the reservation and the entry are one step for abort().
        With tensor parallelism the other ranks learn the blocks (or the refusal) before anything else."""
        rid = header.request_id
        try:
            if self.core.draining.is_set():
                raise base.CapacityError("token worker is draining and takes no new KV")
            with self._changed:
                if rid in self._aborted:
                    log.warning("request %s: KV refused: the request was aborted here within the last %g s "
                                "(a retry must use a new request id)", rid, self.lease)
                    raise base.TransferAborted(f"request {rid} was aborted; its KV is refused")
                entry = ReceivedKV(self, header, self._reserve_blocks(rid, header, caller), caller)
                self._entries[rid] = entry
                self._changed.notify_all()
        except BaseException:
            if not self.engine.is_reserved(rid):  # (a duplicate must not close the shards of the transfer under way)
                self.engine.send_to_ranks(ForgetShard(rid))
            raise
        self.engine.send_to_ranks(ExpectShard(rid, entry.block_ids))
        return entry

    def _reserve_blocks(self, rid: str, header: pb.KVHeader, caller: auth.Caller | None) -> list[int]:
        """Engine thread, under `_changed`: the blocks, made room for by other callers' idle excess if need be.
        The header's leading cached blocks are this worker's own, shared from its prefix cache."""
        num_tokens, cached = len(header.prompt_token_ids), header.num_cached_blocks
        if len(header.block_hashes) < cached:
            raise ValueError(f"header.block_hashes: {len(header.block_hashes)} hashes, num_cached_blocks needs "
                             f"{cached}")
        hashes = list(header.block_hashes[:cached])
        try:
            return self.engine.reserve_kv(rid, num_tokens, hashes)
        except KVCapacityError:
            if not self._free_idle_excess(caller):
                raise
            return self.engine.reserve_kv(rid, num_tokens, hashes)

    def _free_idle_excess(self, caller: auth.Caller | None) -> bool:
        """Frees other callers' reservations that no data reached yet, beyond half the cache each; True if any."""
        share = self.WAITING_SHARE * self.engine.num_total_blocks
        idle: dict = {}
        for entry in self._entries.values():
            if entry.caller != caller and entry.state == RECEIVING and not entry.data_arrived:
                idle.setdefault(entry.caller, []).append(entry)
        freed = False
        for entries in idle.values():
            held = sum(len(e.block_ids) for e in entries)
            for entry in reversed(entries):  # the newest first
                if held <= share:
                    break
                held -= len(entry.block_ids)
                if entry.fail("freed for another caller: no data arrived and its caller held over half the cache",
                              release=self._release):
                    log.warning("request %s: KV reservation freed (no data yet, its caller held %d+ blocks)",
                                entry.request_id, held)
                    freed = True
        return freed

    def claim_shards(self, request_id: str) -> bool:
        """Generate, once this rank's KV is claimed: whether every other rank holds its shard too (they
        stop taking writes for it either way). Always true without tensor parallelism."""
        return self.engine.tp.size == 1 or self.core.loop.run(claim_on_every_rank, self.engine, request_id)

    # ---- Generate and Abort (gRPC threads) ----

    def wait(self, request_id: str, timeout: float) -> ReceivedKV | None:
        """The request's KV once it is READY or FAILED; None if no transfer settles within timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            if not self._changed.wait_for(lambda: request_id in self._entries or request_id in self._aborted,
                                          timeout) or request_id not in self._entries:
                return None
            entry = self._entries[request_id]
        left = max(0.0, deadline - time.monotonic())
        return entry if entry.settled.wait(left) else None

    def forget(self, request_id: str) -> None:
        with self._changed:
            self._entries.pop(request_id, None)

    def abort(self, request_id: str) -> bool:
        """Frees the request's KV, arrived or arriving, and refuses KV that comes for it within the lease."""
        with self._changed:
            self._aborted.add(request_id)
            entry = self._entries.pop(request_id, None)
            self._changed.notify_all()
        return entry is not None and entry.fail("aborted")

    def pending(self) -> int:
        """Transfers receiving or KV waiting for Generate."""
        with self._changed:
            return sum(e.state in (RECEIVING, READY) for e in self._entries.values())

    def release_blocks(self, request_id: str) -> None:
        self.core.loop.run(self._release, request_id)

    def _release(self, request_id: str) -> None:
        self.engine.send_to_ranks(ForgetShard(request_id))  # before the blocks can go to another request
        self.engine.release(request_id)

    # ---- lease and stall ----

    def reap(self) -> None:
        now = time.monotonic()
        with self._changed:
            entries = list(self._entries.values())
        for entry in entries:
            if entry.state == RECEIVING and now - entry.touched > self.transfer_timeout:
                if entry.fail(f"transfer stalled: no data for {self.transfer_timeout:g} s"):
                    log.warning("request %s: KV transfer stalled, blocks freed", entry.request_id)
            elif entry.state == READY and now - entry.touched > self.lease:
                if entry.fail(f"KV not claimed by Generate within the {self.lease:g} s lease"):
                    log.warning("request %s: KV lease expired, blocks freed", entry.request_id)
            elif entry.state in (FAILED, CLAIMED) and now - entry.touched > self.lease:
                self.forget(entry.request_id)

    def _reap_forever(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.reap()
            except Exception:  # noqa: BLE001 - the reaper must keep running
                log.exception("KV reaper")
