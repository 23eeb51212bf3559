"""The router's Prometheus metrics: the names the autoscaler reads (docs/architecture.md).

Per pool (`prompt`, `token`, `mixed`), as the router sees its own traffic:
- inflight_requests: requests in that pool's phase (sent to a worker, not finished there);
- queue_requests: of those, the ones the pool has not started answering yet
  (prompt: Prefill unanswered; token, mixed: no token received yet);
- queue_tokens: prompt pool and mixed pool: prompt tokens not yet prefilled, less those the chosen
  worker's prefix cache holds as far as the router knows (what the worker will compute);
  token pool: tokens still to generate.
A request waiting in the router (for a pool's first worker, or for admission) counts in the queue and
in-flight gauges of the pools it waits for, as it would queued on a worker.

Per request (labelled `model_name`, the served model name): outcomes, prompt and generation tokens, and
the TTFT/TBT/E2E histograms, labelled `pool` too: the pool of the worker that did that part (TTFT: the
first token's worker, prompt or mixed; TBT and E2E: the worker that generated and finished, token or mixed).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

POOLS = ("prompt", "token", "mixed")
OUTCOMES = ("success", "error", "cancelled", "rejected")
# Why admission refused a request with a 429: too many waiting, waited too long, too many on its API key.
REFUSALS = ("queue_full", "queue_wait", "key_limit")
# Why a request moved to another worker (failures.WorkerLost): before its first token a retry, after it a migration.
FAILOVER_REASONS = ("prompt_worker_unavailable", "kv_transfer_failed", "kv_cache_miss", "worker_unavailable",
                    "worker_error", "worker_full", "worker_aborted", "stream_ended", "stalled")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TBT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class RouterMetrics:
    def __init__(self, model_name: str = "") -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r = self.registry
        self.queue_requests = Gauge("phasesplit_queue_requests", "Requests waiting for a worker of the pool",
                                    ["pool"], registry=r)
        self.queue_tokens = Gauge("phasesplit_queue_tokens",
                                  "Prompt tokens waiting to be computed, cached ones not counted (prompt, mixed pools); "
                                  "tokens still to generate (token pool)",
                                  ["pool"], registry=r)
        self.inflight_requests = Gauge("phasesplit_inflight_requests", "Requests in the pool's phase",
                                       ["pool"], registry=r)
        self.pool_workers = Gauge("phasesplit_pool_workers", "Workers in the pool", ["pool"], registry=r)
        self.kv_blocks_used = Gauge("phasesplit_kv_blocks_used", "KV cache blocks in use", ["worker"], registry=r)
        self.kv_blocks_free = Gauge("phasesplit_kv_blocks_free", "KV cache blocks free", ["worker"], registry=r)
        self.kv_utilization = Gauge("phasesplit_kv_utilization", "Used over total KV blocks in the pool",
                                    ["pool"], registry=r)
        self.ttft = self._per_model(Histogram(
            "phasesplit_time_to_first_token_seconds", "Time to first token, by the pool that made it",
            ["model_name", "pool"], buckets=_LATENCY_BUCKETS, registry=r))
        self.tbt = self._per_model(Histogram(
            "phasesplit_time_between_tokens_seconds", "Time between output tokens, by the pool that made them",
            ["model_name", "pool"], buckets=_TBT_BUCKETS, registry=r))
        self.latency = self._per_model(Histogram(
            "phasesplit_request_latency_seconds", "End-to-end latency of successful requests, by the pool that "
            "finished them", ["model_name", "pool"], buckets=_LATENCY_BUCKETS, registry=r))
        self.prompt_tokens = self._per_model(Counter(
            "phasesplit_prompt_tokens", "Prompt tokens of the requests that got their first token",
            ["model_name"], registry=r))
        self.generation_tokens = self._per_model(Counter(
            "phasesplit_generation_tokens", "Output tokens sent to clients", ["model_name"], registry=r))
        self.prefix_cache_queries = Counter("phasesplit_prefix_cache_queries", "Prompt tokens a worker's prefix "
                                            "cache was asked for (each prompt phase's prompt)", ["worker"], registry=r)
        self.prefix_cache_hits = Counter("phasesplit_prefix_cache_hits", "Of those, the prompt tokens the worker "
                                         "found cached and did not compute", ["worker"], registry=r)
        self.kv_transfer_bytes = Counter("phasesplit_kv_transfer_bytes", "KV bytes moved prompt -> token",
                                         registry=r)
        self.kv_transfer_seconds = Counter("phasesplit_kv_transfer_seconds", "Seconds spent moving KV",
                                           registry=r)
        self.kv_blocks_sent = Counter("phasesplit_kv_blocks_sent", "Prompt KV blocks moved prompt -> token "
                                      "(per layer and tensor-parallel rank)", registry=r)
        self.kv_blocks_held = Counter("phasesplit_kv_blocks_held", "Prompt KV blocks not moved: the token worker "
                                      "held them already in its prefix cache", registry=r)
        self.requests = self._per_model(Counter("phasesplit_requests", "Requests by outcome",
                                                ["model_name", "outcome"], registry=r))
        self.migrations = Counter("phasesplit_migrations", "Requests moved to another worker after a worker failed "
                                  "them (stage: before_output = retried, mid_stream = migrated)",
                                  ["reason", "stage"], registry=r)
        self.resume = Histogram("phasesplit_migration_resume_seconds",
                                "From a worker failing a request to the request's next token",
                                buckets=_LATENCY_BUCKETS, registry=r)
        self.lost = Counter("phasesplit_requests_lost", "Requests a worker failure ended with an error "
                            "(attempts used up, or no worker left)", ["stage"], registry=r)
        self.admission_waiting = Gauge("phasesplit_admission_waiting", "Requests waiting for room in the "
                                       "workers' batches before they start", registry=r)
        self.admission_running = Gauge("phasesplit_admission_running", "Requests admitted and not finished",
                                       registry=r)
        self.admission_wait = Histogram("phasesplit_admission_wait_seconds", "Time admitted requests waited to start",
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.admission_refused = Counter("phasesplit_admission_refused", "Requests refused with a 429, by reason "
                                         "(queue_full, queue_wait, key_limit)", ["reason"], registry=r)
        self.worker_streams = WorkerStreams()
        r.register(self.worker_streams)
        self._declare_series()

    def _per_model(self, metric) -> "ForModel":
        return ForModel(metric, self.model_name)

    def _declare_series(self) -> None:
        """Every labelled series exists from the start, at 0: a query sees the pools, outcomes and reasons
        that have had nothing yet."""
        for pool in POOLS:
            for gauge in (self.queue_requests, self.queue_tokens, self.inflight_requests, self.pool_workers,
                          self.kv_utilization):
                gauge.labels(pool=pool).set(0)
        for outcome in OUTCOMES:
            self.requests.labels(outcome=outcome)
        self.prompt_tokens.labels()
        self.generation_tokens.labels()
        # A series born with its first observation would hide that observation from rate().
        for pool in ("prompt", "mixed"):
            self.ttft.labels(pool=pool)
        for pool in ("token", "mixed"):
            self.tbt.labels(pool=pool)
            self.latency.labels(pool=pool)
        for reason in REFUSALS:
            self.admission_refused.labels(reason=reason)
        for stage in ("before_output", "mid_stream"):
            self.lost.labels(stage=stage)
            for reason in FAILOVER_REASONS:
                self.migrations.labels(reason=reason, stage=stage)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def phase(self, pool: str, queued_tokens: int) -> "Phase":
        return Phase(self, pool, queued_tokens)

    def demand(self, pools: Iterable[str], prompt_tokens: int, max_tokens: int) -> list["Phase"]:
        """A request waiting in the router for `pools`, queued in each (close every phase when it stops waiting)."""
        queued_tokens = {"prompt": prompt_tokens, "mixed": prompt_tokens, "token": max_tokens}
        return [self.phase(pool, queued_tokens[pool]) for pool in pools]

    def set_worker_load(self, worker: str, load) -> None:
        """What a poll of the worker (a `WorkerLoad`) read."""
        self.kv_blocks_used.labels(worker=worker).set(load.kv_blocks_used)
        self.kv_blocks_free.labels(worker=worker).set(load.kv_blocks_free)
        self.worker_streams.by_worker[worker] = dict(load.streams_ended)

    def prefix_cache(self, worker: str, prompt_tokens: int, cached_tokens: int) -> None:
        """A prompt phase's reply: of its `prompt_tokens`, `cached_tokens` came from the worker's prefix cache."""
        self.prefix_cache_queries.labels(worker=worker).inc(prompt_tokens)
        self.prefix_cache_hits.labels(worker=worker).inc(cached_tokens)

    def forget_worker(self, worker: str) -> None:
        for gauge in (self.kv_blocks_used, self.kv_blocks_free, self.prefix_cache_queries, self.prefix_cache_hits):
            try:
                gauge.remove(worker)
            except KeyError:
                pass
        self.worker_streams.by_worker.pop(worker, None)


class ForModel:
    """A request-level metric whose `model_name` label is the router's served model: `labels(...)` takes
    the other labels only."""

    def __init__(self, metric, model_name: str):
        self._metric, self._model_name = metric, model_name

    def labels(self, **labels: str):
        return self._metric.labels(model_name=self._model_name, **labels)


class WorkerStreams:
    """Each worker's Generate streams by how they ended, as the worker itself counts them (read by the
    router's polls): a counter that restarts from 0 when the worker does."""

    def __init__(self) -> None:
        self.by_worker: dict[str, dict[str, int]] = {}

    def collect(self):
        family = CounterMetricFamily("phasesplit_worker_streams_ended",
                                     "Generate streams a worker ended, by how (stop, length, abort, error, cancelled)",
                                     labels=["worker", "reason"])
        for worker, counts in sorted(self.by_worker.items()):
            for reason, count in sorted(counts.items()):
                family.add_metric([worker, reason], count)
        yield family


class Phase:
    """One request's stay in one pool's phase, kept in the queue and in-flight gauges."""

    def __init__(self, metrics: RouterMetrics, pool: str, queued_tokens: int):
        self._queue_requests = metrics.queue_requests.labels(pool=pool)
        self._queue_tokens = metrics.queue_tokens.labels(pool=pool)
        self._inflight = metrics.inflight_requests.labels(pool=pool)
        self._queued, self._tokens, self._open = True, queued_tokens, True
        self._inflight.inc()
        self._queue_requests.inc()
        self._queue_tokens.inc(queued_tokens)

    def started(self) -> None:
        if self._queued:
            self._queued = False
            self._queue_requests.dec()

    def consume(self, tokens: int) -> None:
        tokens = min(tokens, self._tokens)
        self._tokens -= tokens
        self._queue_tokens.dec(tokens)

    def close(self) -> None:
        if self._open:
            self._open = False
            self.started()
            self.consume(self._tokens)
            self._inflight.dec()
