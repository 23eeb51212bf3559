"""A discrete-event simulation of a phasesplit cluster, with the running system's own policies.

The router picks workers with `phasesplit.router.scheduling` (join the shortest queue) among the
candidates of `phasesplit.router.lending` (the mixed pool lent to an overloaded side), each
instance batches with `phasesplit.engine.batching` (what the engine's scheduler runs), elastic
pools are sized by `phasesplit.control.scaling` (what the operator and local mode run), and every
iteration takes the time the performance model gives. With a trace of prompt block hashes
(Mooncake format) every instance keeps an LRU prefix cache of 512-token blocks as large as its KV
memory (`fleet.prefix_cache`): a prefill computes only what its cache lacks, a handoff moves only
the blocks the token instance lacks, and `cacheAware` routing (`router.cache_routing`) sends a
request where its prefix is. What it leaves out: the router sees each
worker's load at once (the real one polls), network latency other than the KV handoff, KV
preemption (admission checks the prompt's blocks, as the engine does; decode growth is not
refused), failures.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field

from phasesplit.control.scaling import PoolMetrics, SplitScaler
from phasesplit.control.spec import PoolAutoscaling
from phasesplit.router.cache_routing import (CACHE_AWARE, LEAST_LOADED, LOCAL_PREFILL_TOKENS, check_policy,
                                             pick_cache_aware, pick_cache_aware_token, prefill_locally)
from phasesplit.fleet.instance import Instance
from phasesplit.fleet.perf import Profiles, kv_transfer_time
from phasesplit.fleet.prefix_cache import cached_tokens
from phasesplit.fleet.trace import HASH_BLOCK_TOKENS, Trace
from phasesplit.router.lending import LEND_QUEUE_TOKENS, prompt_candidates, token_candidates
from phasesplit.router.scheduling import Turns, pick_mixed_worker, pick_prompt_worker, pick_token_worker

ROLES = ("prompt", "token", "mixed")


@dataclass(frozen=True)
class PoolSpec:
    """`machines` 8-GPU machines of `hardware` in one pool; `bounds` (machines) makes it elastic."""
    role: str
    hardware: str
    machines: int
    bounds: tuple[int, int] | None = None

    @classmethod
    def parse(cls, role: str, text: str) -> PoolSpec:
        """`HW:N` or `HW:N:MIN-MAX`."""
        parts = text.split(":")
        try:
            hardware, machines = parts[0], int(parts[1])
            bounds = tuple(int(v) for v in parts[2].split("-")) if len(parts) == 3 else None
            if len(parts) > 3 or not hardware or machines < 0 or (bounds and not 0 <= bounds[0] <= bounds[1]):
                raise ValueError
        except (ValueError, IndexError):
            raise ValueError(f"--{role}: {text!r} is not HW:N or HW:N:MIN-MAX (N machines, e.g. h100-80gb:35)") \
                from None
        if bounds and not bounds[0] <= machines <= bounds[1]:
            raise ValueError(f"--{role}: {machines} machines lie outside {bounds[0]}-{bounds[1]}")
        return cls(role, hardware, machines, bounds)

    def __str__(self) -> str:
        return f"{self.role}={self.hardware}:{self.machines}"


@dataclass(frozen=True)
class SimConfig:
    model: str
    tp: int
    pools: tuple[PoolSpec, ...]
    block_size: int = 16
    max_num_batched_tokens: int = 2048   # the prefill token budget (the paper's 2048)
    max_num_seqs: int = 64
    layerwise: bool = True
    autoscale_interval: float = 15.0
    startup_seconds: float = 60.0
    lend_queue_tokens: float = LEND_QUEUE_TOKENS   # prompt queue above which the mixed pool lends
    routing: str = LEAST_LOADED                    # spec.router.routing.policy: cacheAware or leastLoaded
    prefix_caching: bool = True                    # instances keep a prefix cache (traces with block hashes)
    local_prefill_tokens: int = LOCAL_PREFILL_TOKENS   # cacheAware: token workers prefill what is left up to this
    chunked_prefill: int = 0                       # mixed instances' step budget with chunked prefill (0: off)
    timeline_interval: float = 0.0                 # seconds between samples of each pool's load (0: none)

    def __post_init__(self):
        check_policy(self.routing)
        if self.chunked_prefill < 0 or 0 < self.chunked_prefill <= self.max_num_seqs:
            raise ValueError(f"--chunked-prefill: the step budget must exceed --max-num-seqs ({self.max_num_seqs}) "
                             "so that a step has room for a chunk beside a full decode batch, "
                             f"got {self.chunked_prefill}")
        roles = [p.role for p in self.pools]
        if not self.pools or sorted(set(roles)) != sorted(roles):
            raise ValueError("pools: give each of --prompt, --token, --mixed/--baseline at most once, and at least one")
        split = "prompt" in roles or "token" in roles
        if split and not ("prompt" in roles and "token" in roles):
            raise ValueError("pools: a split cluster needs both --prompt and --token")
        if sum(p.machines for p in self.pools) < 1:
            raise ValueError("pools: at least one machine")

    @property
    def split(self) -> bool:
        return any(p.role == "prompt" for p in self.pools)


@dataclass
class Outcome:
    """Per-request times (seconds; NaN where a request did not get there) and the pools' accounting."""
    arrival: list[float]
    prompt_tokens: list[int]
    output_tokens: list[int]
    first: list[float]
    finish: list[float]
    pools: dict[str, dict] = field(default_factory=dict)
    duration: float = 0.0
    rejected: int = 0
    scaling: list[dict] = field(default_factory=list)
    cached_tokens: int = 0        # prompt tokens served from a prefix cache
    prefilled_tokens: int = 0     # prompt tokens of the prefilled requests, cached or not
    kv_bytes_moved: float = 0.0   # KV bytes handed from prompt to token instances
    prefix_caching: bool = False
    extrapolated: dict[str, dict[str, int]] = field(default_factory=dict)   # sizes run beyond the profile
    timeline: dict[str, dict[str, list[float]]] = field(default_factory=dict)   # pool -> time, utilization, queue


class Simulation:
    def __init__(self, config: SimConfig, profiles: Profiles, trace: Trace):
        self.config, self.profiles, self.trace = config, profiles, trace
        self.now = 0.0
        self._events: list = []
        self._order = itertools.count()
        n = len(trace)
        self.prompt_tokens = [int(x) for x in trace.prompt]
        self.output_tokens = [int(x) for x in trace.output]
        self.first = [math.nan] * n
        self.finished = [math.nan] * n
        self.token_target: list[Instance | None] = [None] * n
        self.reservation = [0] * n
        self.join_step = [0] * n
        self.blocks = trace.blocks if config.prefix_caching else None
        self.cached = [0] * n        # prompt tokens a request's prefill found in its instance's cache
        self.queued = [0] * n        # prompt tokens the router counted against its prompt instance
        self.kv_bytes_moved = 0.0
        self.cache_aware = config.routing == CACHE_AWARE
        self.extrapolated: dict[str, dict[str, int]] = {}
        self.timeline = {p.role: {"time": [], "utilization": [], "queue": []} for p in config.pools}
        self._busy_seen = {p.role: 0.0 for p in config.pools}
        self.perf = {p.role: profiles.get(config.model, p.hardware, config.tp) for p in config.pools}
        self.num_layers = profiles.num_layers(config.model)
        self.pools: dict[str, list[Instance]] = {p.role: [] for p in config.pools}
        self.retired: dict[str, list[Instance]] = {p.role: [] for p in config.pools}
        self.rejected = 0
        self.arrived = 0
        self.scaling_log: list[dict] = []
        self._names = itertools.count()
        self.turns = Turns()   # as the router's: equal instances take turns
        for p in config.pools:
            for _ in range(p.machines * self.perf[p.role].instances_per_machine):
                self._add_instance(p.role)
        self.scaler = self._scaler()

    # ---- events ----
    def at(self, time: float, fn, arg) -> None:
        heapq.heappush(self._events, (time, next(self._order), fn, arg))

    def run(self) -> Outcome:
        arrival = [float(t) for t in self.trace.arrival]
        if self.scaler:
            self.at(self.config.autoscale_interval, self._autoscale, None)
        if self.config.timeline_interval > 0:
            self.at(self.config.timeline_interval, self._sample, None)
        events, n = self._events, len(arrival)
        while self.arrived < n or events:
            i = self.arrived
            if i < n and (not events or arrival[i] <= events[0][0]):
                self.now = arrival[i]
                self.arrived += 1
                self.route(i)
            else:
                time, _, fn, arg = heapq.heappop(events)
                self.now = time
                fn(time, arg)
        return self._outcome(arrival)

    # ---- the router ----
    def route(self, rid: int) -> None:
        now, n = self.now, self.prompt_tokens[rid]
        if self.config.split:
            prompt_w, token_w = self._pick_split(rid, now)
            if prompt_w is None or token_w is None:
                self.rejected += 1
                return
            if self.cache_aware and prefill_locally(self.cached_on(token_w, rid), n, self.config.local_prefill_tokens):
                prompt_w = token_w
            blocks = math.ceil((n + 1) / self.config.block_size)   # as the router reserves
            self.reservation[rid] = blocks
            token_w.reserved_blocks += blocks
            token_w.inflight += 1
            self.token_target[rid] = token_w
        else:
            prompt_w = self._pick_mixed(rid, now)
            if prompt_w is None:
                self.rejected += 1
                return
        # The router counts what it expects the prefill to compute: all of it unless it knows the cache.
        self.queued[rid] = n - self.cached_on(prompt_w, rid) if self.cache_aware else n
        prompt_w.queued_prompt_tokens += self.queued[rid]
        prompt_w.inflight += 1
        prompt_w.add_prompt(rid, now)

    def cached_on(self, w: Instance, rid: int) -> int:
        """Prompt tokens of `rid` that `w`'s prefix cache holds now."""
        if w.cache is None:
            return 0
        return cached_tokens(w.cache.match(self.blocks[rid]), self.prompt_tokens[rid], HASH_BLOCK_TOKENS)

    def _pick_mixed(self, rid: int, now: float) -> Instance | None:
        workers = self.pools.get("mixed", ())
        for w in workers:
            w.refresh(now)
        if self.cache_aware:
            return self.turns.take(pick_cache_aware(workers, lambda w: self.cached_on(w, rid), self.prompt_tokens[rid],
                                                    pick_mixed_worker))
        return self.turns.take(pick_mixed_worker(workers))

    def _pick_split(self, rid: int, now: float) -> tuple[Instance | None, Instance | None]:
        """Split serving, with a mixed pool (if any) lent to the overloaded side as the router does."""
        mixed = self.pools.get("mixed", [])
        for w in self.pools["token"] + mixed:
            w.refresh(now)
        prompt = prompt_candidates(self.pools["prompt"], mixed, self.config.lend_queue_tokens)
        token = token_candidates(self.pools["token"], mixed, self.prompt_tokens[rid] + 1)
        if self.cache_aware:
            cached, n = (lambda w: self.cached_on(w, rid)), self.prompt_tokens[rid]
            return (self.turns.take(pick_cache_aware(prompt, cached, n, pick_prompt_worker)),
                    self.turns.take(pick_cache_aware_token(token, cached, n + 1)))
        return self.turns.take(pick_prompt_worker(prompt)), self.turns.take(pick_token_worker(token))

    # ---- callbacks from instances ----
    def note_size(self, kind: str, size: int, largest_measured: int) -> None:
        """Record an iteration whose `kind` (decode_batch, prefill_tokens) lies beyond the profile's points."""
        if size > largest_measured:
            seen = self.extrapolated.setdefault(kind, {"largest_run": size, "largest_measured": largest_measured})
            seen["largest_run"] = max(seen["largest_run"], size)
            seen["largest_measured"] = max(seen["largest_measured"], largest_measured)

    def first_token(self, rid: int, now: float) -> None:
        self.first[rid] = now

    def finish(self, rid: int, now: float) -> None:
        self.finished[rid] = now

    def kv_handoff_time(self, src: Instance, dst: Instance, num_tokens: int, prefill_s: float) -> float:
        """Seconds the handoff of `num_tokens` tokens' KV adds after the prefill; counts the bytes moved."""
        self.kv_bytes_moved += num_tokens * src.perf.kv_bytes_per_token
        bps = min(src.perf.link_bytes_per_s, dst.perf.link_bytes_per_s)
        return kv_transfer_time(num_tokens, prefill_s, src.perf.kv_bytes_per_token, bps, self.num_layers,
                                self.config.layerwise)

    # ---- elastic pools ----
    def _add_instance(self, role: str) -> Instance:
        w = Instance(self, f"{role}-{next(self._names)}", role, role, self.perf[role])
        w.refresh(self.now)
        self.pools[role].append(w)
        return w

    def retire(self, w: Instance, now: float) -> None:
        w.stopped = now
        self.pools[w.role].remove(w)
        self.retired[w.role].append(w)

    def _scaler(self) -> SplitScaler | None:
        knobs = {}
        for p in self.config.pools:
            if p.bounds is None:
                continue
            per_machine = self.perf[p.role].instances_per_machine
            metric, target = (("queueTokens", 2.0 * self.config.max_num_batched_tokens) if p.role == "prompt"
                              else ("inflightRequests", 0.75 * self.config.max_num_seqs))
            knobs[p.role] = PoolAutoscaling(min_replicas=p.bounds[0] * per_machine,
                                            max_replicas=max(p.bounds[1] * per_machine, 1), metric=metric,
                                            target_per_replica=target)
        return SplitScaler(knobs) if knobs else None

    def _autoscale(self, now: float, _) -> None:
        metrics, current = {}, {}
        for role in self.scaler.pools:
            workers = self.pools[role]
            routable = [w for w in workers if w.routable]
            metrics[role] = PoolMetrics(
                queue_requests=sum(len(w.waiting) + len(w.ready) for w in workers),
                queue_tokens=sum(w.queued_prompt_tokens for w in workers),
                inflight_requests=sum(w.inflight for w in workers),
                kv_utilization=(sum(w.kv_utilization(now) for w in routable) / len(routable)) if routable else None)
            current[role] = len(routable)
        for role, d in self.scaler.evaluate(metrics, current, now).items():
            if d.changed:
                self.scaling_log.append({"time": round(now, 3), "pool": role, "from": d.current, "to": d.desired,
                                         "reason": d.reason})
                self._resize(role, d.desired - d.current, now)
        if self.arrived < len(self.first) or self._events:
            self.at(now + self.config.autoscale_interval, self._autoscale, None)

    def _resize(self, role: str, delta: int, now: float) -> None:
        if delta > 0:
            for _ in range(delta):
                w = self._add_instance(role)
                w.routable = False     # starting: not routable, but paid for
                self.at(now + self.config.startup_seconds, self._started, w)
            return
        # The least-loaded go first (the operator's pod-deletion-cost order).
        for w in sorted((w for w in self.pools[role] if w.routable), key=lambda w: w.inflight)[:-delta]:
            w.routable = False
            if w.busy_until is None and not w.inflight:
                self.retire(w, now)

    def _started(self, now: float, w: Instance) -> None:
        w.routable = True

    # ---- the load over time (for plots) ----
    def _sample(self, now: float, _) -> None:
        """Each pool's busy share over the last interval and its queue (requests waiting) now."""
        interval = self.config.timeline_interval
        for role, workers in self.pools.items():
            busy = sum(w.busy_at(now) for w in workers + self.retired[role])
            share = (busy - self._busy_seen[role]) / (max(len(workers), 1) * interval)
            self._busy_seen[role] = busy
            line = self.timeline[role]
            line["time"].append(round(now, 3))
            line["utilization"].append(round(min(max(share, 0.0), 1.0), 4))
            line["queue"].append(sum(len(w.waiting) + len(w.ready) for w in workers))
        if self.arrived < len(self.first) or any(w.busy_until is not None or w.inflight
                                                  for workers in self.pools.values() for w in workers):
            self.at(now + interval, self._sample, None)

    # ---- results ----
    def _outcome(self, arrival: list[float]) -> Outcome:
        end = max((f for f in self.finished if not math.isnan(f)), default=0.0)
        pools = {}
        for role, active in self.pools.items():
            workers = active + self.retired[role]
            perf = self.perf[role]
            seconds = sum((w.stopped if w.stopped is not None else end) - w.started for w in workers)
            busy = sum(w.busy_seconds for w in workers)
            machines_avg = seconds / max(end, 1e-9) / perf.instances_per_machine
            pools[role] = {"hardware": perf.hardware.name, "machines": round(machines_avg, 3),
                           "utilization": round(busy / seconds, 4) if seconds else 0.0,
                           "cost_per_hour": round(machines_avg * perf.hardware.cost_per_hour, 2),
                           "power_w": round(machines_avg * perf.hardware.power_w, 1),
                           "kv_capacity_tokens": int(machines_avg * perf.instances_per_machine
                                                     * perf.kv_capacity_tokens)}
        prefilled = [i for i, t in enumerate(self.first) if not math.isnan(t)]
        return Outcome(arrival, self.prompt_tokens, self.output_tokens, self.first, self.finished, pools,
                       end, self.rejected, self.scaling_log,
                       cached_tokens=sum(self.cached[i] for i in prefilled),
                       prefilled_tokens=sum(self.prompt_tokens[i] for i in prefilled),
                       kv_bytes_moved=self.kv_bytes_moved, prefix_caching=self.blocks is not None,
                       extrapolated=self.extrapolated, timeline=self.timeline)


def simulate(config: SimConfig, profiles: Profiles, trace: Trace) -> Outcome:
    return Simulation(config, profiles, trace).run()
