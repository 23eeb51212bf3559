"""One simulated engine instance: the engine scheduler's batching rules, timed by the performance model.

It carries the attributes the router's join-the-shortest-queue functions read (the names of
`phasesplit.router.workers.WorkerState`), so the simulated router calls those very functions.

Roles, as the real workers: `prompt` runs prefill batches and hands each request's KV to a token
instance; `token` decodes requests whose KV has arrived; `mixed` prefills and decodes (prefill
first, as `phasesplit.engine.scheduler.Scheduler` does) and can also act as either of the others.

Decoding is simulated by stretches: between two changes of the decode batch every iteration takes
the same time, so one event covers all iterations up to the next finish; a request that arrives
meanwhile joins at the next iteration boundary.

With prefix caching (a trace of block hashes) the instance keeps an LRU cache of 512-token prompt
blocks as large as its KV memory: a prefill computes the tokens its cache lacks (priced as a
prefill of those tokens), a prompt's blocks enter the cache when its prefill ends (a token
instance's when its KV arrives).

With chunked prefill (`chunked_prefill`: the step's token budget; mixed instances only) every step
takes the running decodes, then prompt chunks up to the budget less the decodes (the engine's
`take_chunks`), and costs `perf.mixed_time`; a step without chunks is a plain decode iteration.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from typing import TYPE_CHECKING

from phasesplit.engine.batching import take_chunks, take_prefill, take_ready
from phasesplit.fleet.perf import PerfModel
from phasesplit.fleet.prefix_cache import PrefixCache
from phasesplit.fleet.trace import HASH_BLOCK_TOKENS

if TYPE_CHECKING:
    from phasesplit.fleet.sim import Simulation


class Instance:
    def __init__(self, sim: Simulation, address: str, role: str, pool: str, perf: PerfModel):
        self.sim, self.address, self.role, self.pool, self.perf = sim, address, role, pool, perf
        # what the router's scheduling functions read
        self.routable = True
        self.queued_prompt_tokens = 0
        self.inflight = 0
        self.last_picked = 0
        self.free_blocks = 0.0
        self.reserved_blocks = 0
        self.max_batch = sim.config.max_num_seqs
        # engine state
        self.waiting: deque[int] = deque()   # request ids waiting for prefill
        self.ready: deque[int] = deque()     # request ids whose KV arrived, waiting for a decode slot
        self.finishing: list[tuple[int, int]] = []   # (finish step, request id) of the decode batch
        self.num_running = 0
        self.step = 0                        # decode iterations done
        self.sum_join_step = 0
        self.resident_tokens = 0             # prompt KV tokens of the decoding requests (as the engine's blocks)
        self.prefill_tokens_held = 0         # prompt KV of a prefill batch until it is handed off
        self.busy_until = None               # end of the current event's work, None when idle
        self.prefilling: list = []          # the prefill batch, or a mixed step's chunks, in progress
        self.chunk_budget = sim.config.chunked_prefill if role == "mixed" else 0
        self.partial: list[int] = []         # prompts begun in chunks
        self.left: dict[int, int] = {}       # prompt tokens still to compute, per admitted chunked prompt
        self.stretch = (0.0, 0.0, 0)         # (start time, iteration seconds, iterations)
        self.version = 0
        self.busy_seconds = 0.0
        self.started = sim.now
        self.stopped: float | None = None
        self.block_size = bs = sim.config.block_size
        self.capacity_blocks = perf.kv_capacity_tokens // bs
        self.cache = PrefixCache(perf.kv_capacity_tokens // HASH_BLOCK_TOKENS) if sim.blocks is not None else None

    # ---- what the router sees ----
    @property
    def busy_slots(self) -> int:
        return self.inflight

    def refresh(self, now: float) -> None:
        """Free KV blocks as the router computes them: polled free blocks less its own reservations."""
        generated = self.num_running * self._step_at(now) - self.sum_join_step
        used = (self.resident_tokens + self.prefill_tokens_held + generated) / self.sim.config.block_size
        self.free_blocks = self.capacity_blocks - used - self.reserved_blocks

    def kv_utilization(self, now: float) -> float:
        self.refresh(now)
        return 1.0 - (self.free_blocks + self.reserved_blocks) / max(self.capacity_blocks, 1)

    def busy_at(self, now: float) -> float:
        """Busy seconds up to `now` (a prefill is counted when it starts, a decode stretch when it ends)."""
        if self.busy_until is None:
            return self.busy_seconds
        if self.prefilling:
            return self.busy_seconds - max(self.busy_until - now, 0.0)
        t0, dt, k = self.stretch
        return self.busy_seconds + min(max(now - t0, 0.0), dt * k)

    def _step_at(self, now: float) -> int:
        if self.busy_until is None or self.prefilling:
            return self.step
        t0, dt, k = self.stretch
        return self.step + min(k, int((now - t0) / dt)) if dt > 0 else self.step

    # ---- arrivals ----
    def add_prompt(self, rid: int, now: float) -> None:
        self.waiting.append(rid)
        self._wake(now)

    def add_ready(self, rid: int, now: float) -> None:
        self.ready.append(rid)
        self._wake(now)

    def _wake(self, now: float) -> None:
        if self.busy_until is None:
            # The engine loop takes its next step once everything that arrived at this instant is queued.
            self.version += 1
            self.stretch = (now, 0.0, 0)
            self.busy_until = now
            self.sim.at(now, self._stretch_end, self.version)
        elif not self.prefilling and self.num_running < self.sim.config.max_num_seqs:
            self._cut_stretch(now)

    def _cut_stretch(self, now: float) -> None:
        """End the decode stretch at the next iteration boundary, so waiting work can join."""
        t0, dt, k = self.stretch
        if not k:
            return
        done = min(k, int((now - t0) / dt) + 1)
        if done < k:
            self.version += 1
            self.stretch = (t0, dt, done)
            self.busy_until = t0 + done * dt
            self.sim.at(self.busy_until, self._stretch_end, self.version)

    # ---- iterations ----
    def _stretch_end(self, now: float, version: int) -> None:
        if version == self.version:
            self._boundary(now, self.stretch[2])

    def _boundary(self, now: float, steps_done: int) -> None:
        cfg = self.sim.config
        self.step += steps_done
        if steps_done:
            self.busy_seconds += steps_done * self.stretch[1]
        finishing = self.finishing
        while finishing and finishing[0][0] <= self.step:
            _, rid = heapq.heappop(finishing)
            self._leave(rid)
            self.sim.finish(rid, now)
        self.busy_until = None
        if self.chunk_budget:
            self._chunked_step(now)
            return
        if self.waiting:
            batch = take_prefill(self.waiting, cfg.max_num_batched_tokens, self._prefill_slots(),
                                 self._to_compute, self._admit)
            if batch:
                self._start_prefill(batch, now)
                return
        for rid in take_ready(self.ready, self.num_running, cfg.max_num_seqs):
            self._join(rid, self.sim.output_tokens[rid] - 1)
        if self.num_running:
            self._start_decode(now)
        elif self.stopped is None and not self.routable and not self.inflight:
            self.sim.retire(self, now)

    def _start_decode(self, now: float) -> None:
        """Iterations of the same batch until its first request finishes (or work arrives: `_wake`)."""
        self.sim.note_size("decode_batch", self.num_running, self.perf.largest_measured_batch)
        dt = self.perf.token_time(self.num_running)
        k = self.finishing[0][0] - self.step
        self.version += 1
        self.stretch = (now, dt, k)
        self.busy_until = now + k * dt
        self.sim.at(self.busy_until, self._stretch_end, self.version)

    def _prefill_slots(self) -> int:
        # A prompt worker's prefilled requests leave its batch at once (their KV is held for the handoff).
        if self.role == "prompt":
            return self.sim.config.max_num_seqs
        return self.sim.config.max_num_seqs - self.num_running

    def _admit(self, rid: int) -> bool:
        """The KV check of the engine's scheduler: the prompt's blocks must be free; they are taken at once."""
        self.refresh(self.sim.now)
        n = self.sim.prompt_tokens[rid]
        if math.ceil(n / self.sim.config.block_size) > self.free_blocks:
            return False
        self.prefill_tokens_held += n
        if self.cache is not None:
            self.sim.cached[rid] = self.sim.cached_on(self, rid)
            self.cache.touch(self.sim.blocks[rid])
        return True

    def _to_compute(self, rid: int) -> int:
        """Prompt tokens the prefill of `rid` computes: those the prefix cache lacks."""
        return self.sim.prompt_tokens[rid] - self.sim.cached_on(self, rid)

    def _start_prefill(self, batch: list[int], now: float) -> None:
        tokens = sum(self.sim.prompt_tokens[r] - self.sim.cached[r] for r in batch)
        self.sim.note_size("prefill_tokens", tokens, self.perf.largest_measured_prefill)
        dt = self.perf.prompt_time(tokens)
        self.prefilling = batch
        self.busy_until = now + dt
        self.busy_seconds += dt
        self.version += 1
        self.sim.at(self.busy_until, self._prefill_end, (self.version, dt))

    def _prefill_end(self, now: float, arg: tuple[int, float]) -> None:
        _, dt = arg
        batch, self.prefilling = self.prefilling, []
        for rid in batch:
            self._prompt_done(rid, now, dt)
        self._boundary(now, 0)

    def _prompt_done(self, rid: int, now: float, dt: float) -> None:
        """The prompt's last token is computed (`dt`: the last step's seconds): its first token, then
        the end, a decode here, or the handoff."""
        sim = self.sim
        n = sim.prompt_tokens[rid]
        self.queued_prompt_tokens -= sim.queued[rid]
        if self.cache is not None:
            self.cache.insert(sim.blocks[rid])
        sim.first_token(rid, now)
        target = sim.token_target[rid]
        if sim.output_tokens[rid] <= 1:
            self.prefill_tokens_held -= n
            self.inflight -= 1
            if target is not None:
                target.release_reservation(rid)
                target.inflight -= 1
            sim.finish(rid, now)
        elif target is None or target is self:
            self.prefill_tokens_held -= n
            if target is self:   # a mixed instance lent as both prompt and token machine
                self.release_reservation(rid)
                self.inflight -= 1
            self.resident_tokens += n
            self._join(rid, sim.output_tokens[rid] - 1)
        else:
            delay = sim.kv_handoff_time(self, target, n - sim.cached_on(target, rid), dt)
            sim.at(now + delay, self._handed_off, rid)

    # ---- chunked prefill ----
    def _chunked_step(self, now: float) -> None:
        cfg = self.sim.config
        for rid in take_ready(self.ready, self.num_running + len(self.partial), cfg.max_num_seqs):
            self._join(rid, self.sim.output_tokens[rid] - 1)
        chunks = []
        if self.partial or self.waiting:
            chunks = take_chunks(self.partial, self.waiting, self.chunk_budget - self.num_running,
                                 cfg.max_num_seqs - self.num_running - len(self.partial), self._left_to_compute,
                                 self._admit_chunked, lambda rid: True)
        if chunks:
            self._start_mixed(chunks, now)
        elif self.num_running:
            self._start_decode(now)
        elif self.stopped is None and not self.routable and not self.inflight:
            self.sim.retire(self, now)

    def _left_to_compute(self, rid: int) -> int:
        return self.left[rid] if rid in self.left else self._to_compute(rid)

    def _admit_chunked(self, rid: int) -> bool:
        if not self._admit(rid):
            return False
        self.left[rid] = self.sim.prompt_tokens[rid] - self.sim.cached[rid]
        return True

    def _start_mixed(self, chunks: list[tuple[int, int]], now: float) -> None:
        prompt = self.sim.prompt_tokens
        self.sim.note_size("decode_batch", self.num_running, self.perf.largest_measured_batch)
        dt = self.perf.mixed_time([(prompt[rid] - self.left[rid], n) for rid, n in chunks], self.num_running)
        self.partial += [rid for rid, _ in chunks if rid not in self.partial]
        self.prefilling = chunks
        self.busy_until = now + dt
        self.busy_seconds += dt
        self.version += 1
        self.sim.at(self.busy_until, self._mixed_end, dt)

    def _mixed_end(self, now: float, dt: float) -> None:
        chunks, self.prefilling = self.prefilling, []
        if self.num_running:
            self.step += 1   # the step decoded every running sequence once
        for rid, n in chunks:
            self.left[rid] -= n
            if not self.left[rid]:
                del self.left[rid]
                self.partial.remove(rid)
                self._prompt_done(rid, now, dt)
        self._boundary(now, 0)

    def _handed_off(self, now: float, rid: int) -> None:
        self.prefill_tokens_held -= self.sim.prompt_tokens[rid]
        self.inflight -= 1
        target = self.sim.token_target[rid]
        target.release_reservation(rid)
        target.resident_tokens += self.sim.prompt_tokens[rid]
        if target.cache is not None:
            target.cache.insert(self.sim.blocks[rid])
        target.add_ready(rid, now)
        if self.busy_until is None and self.waiting:
            self._boundary(now, 0)
        elif self.busy_until is None and not self.routable and not self.inflight and self.stopped is None:
            self.sim.retire(self, now)

    def release_reservation(self, rid: int) -> None:
        self.reserved_blocks -= self.sim.reservation[rid]

    def _join(self, rid: int, remaining: int) -> None:
        heapq.heappush(self.finishing, (self.step + remaining, rid))
        self.num_running += 1
        self.sum_join_step += self.step
        self.sim.join_step[rid] = self.step

    def _leave(self, rid: int) -> None:
        self.num_running -= 1
        self.sum_join_step -= self.sim.join_step[rid]
        self.resident_tokens -= self.sim.prompt_tokens[rid]
        self.inflight -= 1
