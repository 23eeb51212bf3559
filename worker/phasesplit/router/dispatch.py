"""One request through the pools: prefill on a prompt worker, decode on a token worker (or both on a mixed one).
A worker that fails the request is replaced: retried before output, migrated after (the `RequestRun`
keeps count)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from phasesplit.logs import REQUEST_ID_METADATA
from phasesplit.router.admission import Admission, AdmissionSettings
from phasesplit.router.cache_routing import RoutingSettings, pick_cache_aware, pick_cache_aware_token, prefill_locally
from phasesplit.router.cache_view import PromptHashes
from phasesplit.router.failures import (WorkerLost, lost_in_prefill, lost_in_stream, no_worker, request_lost,
                                        worker_failed)
from phasesplit.router.lending import prompt_candidates, token_candidates
from phasesplit.router.metrics import RouterMetrics
from phasesplit.router.openai_api import APIError
from phasesplit.router.pools import Pools
from phasesplit.router.request import Attempt, Delta, Job, MigrationPolicy, RequestRun
from phasesplit.router.scheduling import pick_mixed_worker, pick_prompt_worker, pick_token_worker
from phasesplit.router.stalls import Stalled, watch_stalls
from phasesplit.router.waiting import EmptyPoolQueue, QueueSettings
from phasesplit.router.workers import WorkerState
from phasesplit.v1 import worker_pb2 as pb

log = logging.getLogger(__name__)


class TokenizerChanged(Exception):
    """The workers now read token ids with another tokenizer than the job's: tokenize it again."""


class Dispatcher:
    def __init__(self, pools: Pools, metrics: RouterMetrics, policy: MigrationPolicy = MigrationPolicy(),
                 queue: QueueSettings = QueueSettings(), admission: AdmissionSettings = AdmissionSettings(),
                 routing: RoutingSettings = RoutingSettings()):
        self.pools, self.metrics, self.policy, self.routing = pools, metrics, policy, routing
        self.queue = EmptyPoolQueue(pools, metrics, queue)
        self.admission = Admission(pools, metrics, admission)
        self._cleanup: set[asyncio.Task] = set()

    async def run(self, job: Job) -> AsyncIterator[Delta]:
        """Yields the request's output once it is admitted; closing the iterator early cancels the request on
        every worker."""
        prompt_tokens, max_tokens = len(job.prompt_token_ids), job.sampling.max_tokens
        try:
            route = await self.queue.route(prompt_tokens, max_tokens)
            slot = await self.admission.admit(route, prompt_tokens, max_tokens)
        except APIError:
            self.metrics.requests.labels(outcome="rejected").inc()
            raise
        with slot:
            async with aclosing(self._admitted(job, route)) as deltas:
                async for delta in deltas:
                    yield delta

    async def _admitted(self, job: Job, route: str) -> AsyncIterator[Delta]:
        if self._tokenizer_changed(job):
            raise TokenizerChanged(job.request_id)
        run, outcome = RequestRun(job, self.policy, route=route), "error"
        try:
            async with aclosing(self._resilient(run)) as steps:
                async for delta in steps:
                    self._observe(run, delta)
                    if delta.finish_reason:
                        outcome = "success"   # even if the caller closes us right after this last delta
                    yield delta
        except (asyncio.CancelledError, GeneratorExit):
            if outcome != "success":
                outcome = "cancelled"
            raise
        finally:
            self._finish(run, outcome)

    def _observe(self, run: RequestRun, delta: Delta) -> None:
        n = len(delta.token_ids)
        if not n:
            return
        now = time.monotonic()
        self.metrics.generation_tokens.labels().inc(n)
        if run.first_token is None:
            run.first_token = run.last_token = now
            self.metrics.ttft.labels(pool=run.prompt_pool).observe(now - run.job.arrival)
            self.metrics.prompt_tokens.labels().inc(len(run.job.prompt_token_ids))
            n -= 1
        if n:   # tokens held back with an incomplete character arrive together with the next text
            tbt = self.metrics.tbt.labels(pool=run.token_pool)
            for _ in range(n):
                tbt.observe((now - run.last_token) / n)
        run.last_token = now
        run.completion_tokens += len(delta.token_ids)

    def _finish(self, run: RequestRun, outcome: str) -> None:
        job = run.job
        job.completion_tokens = run.completion_tokens
        self.metrics.requests.labels(outcome=outcome).inc()
        elapsed = time.monotonic() - job.arrival
        if outcome == "success":
            self.metrics.latency.labels(pool=run.token_pool).observe(elapsed)
        log.log(logging.INFO if run.failures else logging.DEBUG,
                "request %s %s route=%s prompt_worker=%s token_worker=%s failed_workers=[%s] prompt_tokens=%d "
                "completion_tokens=%d ttft=%s e2e=%.4f prompt_phase=[%s]", job.request_id, outcome, run.route,
                run.prompt_worker, run.token_worker, ", ".join(run.failures), len(job.prompt_token_ids),
                run.completion_tokens, f"{run.first_token - job.arrival:.4f}" if run.first_token else "-", elapsed,
                run.prefill, extra={"request_id": job.log_id})

    # ---- attempts: retries before output, migrations after ----
    async def _resilient(self, run: RequestRun) -> AsyncIterator[Delta]:
        """Runs attempts until one finishes. Tokens whose text is still held back (an incomplete character)
        are passed on with the next text: the client has seen none of them, so a migration runs them again."""
        while True:
            attempt = self._next_attempt(run)
            steps = self._split(run, attempt) if run.route == "split" else self._mixed(run, attempt)
            try:
                async with aclosing(steps):
                    async for delta in steps:
                        if released := run.release(delta):
                            if (seconds := run.recovered()) is not None:
                                self.metrics.resume.observe(seconds)
                            yield released
                return
            except WorkerLost as lost:
                self._replace(run, attempt, lost)
            except APIError:
                if run.failed:
                    self._lose(run)
                raise

    def _next_attempt(self, run: RequestRun) -> Attempt:
        """The next attempt, on the route the pools make now; after a failure, an APIError when none can go on."""
        if run.failed and self._tokenizer_changed(run.job):   # a migration during a rollout: the ids mean nothing here
            self._lose(run)
            raise request_lost(run.failures[-1], "the workers left read another tokenizer (a rollout): send it again")
        route = self.pools.route()
        if route is None and run.failed:
            self._lose(run)
            raise request_lost(run.failures[-1], f"no other can take it: {self.pools.why_not()}")
        run.route = route or run.route
        return run.next_attempt()

    def _replace(self, run: RequestRun, attempt: Attempt, lost: WorkerLost) -> None:
        """Counts the failure towards a retry or a migration; raises the worker's error when none is left."""
        stage = run.stage
        allowed = run.fail(lost.worker.address, lost.reason, blame=lost.blame)
        if lost.down:
            lost.worker.mark_down(f"failed request {attempt.request_id}: {lost.reason}")
        if not allowed:
            self._lose(run)
            raise lost.error from None
        self.metrics.migrations.labels(reason=lost.reason, stage=stage).inc()
        log.warning("request %s: %s worker %s failed it (%s: %s) after %d tokens; %s",
                    run.job.request_id, lost.worker.pool, lost.worker.address, lost.reason, lost.error.message,
                    len(run.sent), "migrating" if run.sent else "retrying")

    def _tokenizer_changed(self, job: Job) -> bool:
        """Whether the workers now routable read token ids with another tokenizer than the job's."""
        current = self.pools.tokenizer.digest if self.pools.tokenizer else ""
        return bool(job.tokenizer and current and job.tokenizer != current)

    def _lose(self, run: RequestRun) -> None:
        self.metrics.lost.labels(stage=run.stage).inc()
        log.error("request lost after %d tokens; workers that failed it: %s", len(run.sent), ", ".join(run.failures))

    # ---- picking workers ----
    def _pick(self, pool: str, worker: WorkerState | None, run: RequestRun) -> WorkerState:
        """Records the pick (equal workers take turns); no worker is a 503."""
        if worker is None:
            raise no_worker(pool, run.failed)
        return self.pools.turns.take(worker)

    def _pick_token_worker(self, run: RequestRun, hashes: PromptHashes) -> WorkerState:
        """cacheAware: the one whose cache holds most of the prompt, where that steers; else the least loaded."""
        tokens = len(hashes.token_ids) + 1
        candidates = token_candidates(self.pools["token"].workers.values(), self.pools["mixed"].workers.values(),
                                      tokens)
        if self.routing.cache_aware:
            picked = pick_cache_aware_token(candidates, _cached(hashes), tokens, exclude=run.failed,
                                            threshold=self.routing.cache_threshold)
        else:
            picked = pick_token_worker(candidates, exclude=run.failed, tokens=tokens)
        worker = self._pick("token", picked, run)
        if run.token_worker and worker.address != run.token_worker:
            log.info("request %s: token worker %s -> %s", run.job.request_id, run.token_worker, worker.address)
        run.token_worker, run.token_pool = worker.address, worker.pool
        return worker

    def _pick_prompt_worker(self, run: RequestRun, hashes: PromptHashes) -> WorkerState:
        candidates = prompt_candidates(self.pools["prompt"].workers.values(), self.pools["mixed"].workers.values())
        picked = self._pick_by_cache(candidates, hashes, run, pick_prompt_worker)
        worker = self._pick("prompt", picked, run)
        run.prompt_worker, run.prompt_pool = worker.address, worker.pool
        return worker

    def _pick_mixed_worker(self, run: RequestRun, hashes: PromptHashes) -> WorkerState:
        picked = self._pick_by_cache(self.pools["mixed"].workers.values(), hashes, run, pick_mixed_worker)
        worker = self._pick("mixed", picked, run)
        run.prompt_worker = run.token_worker = worker.address
        run.prompt_pool = run.token_pool = worker.pool
        return worker

    def _pick_by_cache(self, candidates, hashes: PromptHashes, run: RequestRun, least_loaded) -> WorkerState | None:
        """A worker to compute the prompt: cacheAware weighs its cache against its queue; else the least loaded."""
        if not self.routing.cache_aware:
            return least_loaded(candidates, exclude=run.failed)
        return pick_cache_aware(candidates, _cached(hashes), len(hashes.token_ids), least_loaded, exclude=run.failed,
                                threshold=self.routing.cache_threshold, slack=self.routing.balance_slack)

    def _prompt_computed(self, worker: WorkerState, hashes: PromptHashes, cached_tokens: int) -> None:
        """A worker answered a prompt phase: count its cache's hit, and expect the prompt's blocks there."""
        self.metrics.prefix_cache(worker.address, len(hashes.token_ids), cached_tokens)
        worker.expect_cached(hashes.full(worker.block_size))

    # ---- split: prompt worker then token worker ----
    async def _split(self, run: RequestRun, attempt: Attempt) -> AsyncIterator[Delta]:
        n, rid = len(attempt.prompt_token_ids), attempt.request_id
        hashes = _prompt_hashes(attempt)
        token_w = self._pick_token_worker(run, hashes)
        if self.routing.cache_aware and prefill_locally(_cached(hashes)(token_w), n, self.routing.local_prefill_tokens):
            run.prompt_worker, run.prompt_pool = token_w.address, token_w.pool
            async with aclosing(self._both_phases(run, attempt, token_w, "token", hashes)) as deltas:
                async for delta in deltas:
                    yield delta
            return
        finished = decoded = generating = False
        with token_w.assign(rid, kv_blocks=math.ceil((n + 1) / token_w.block_size)) as assignment:
            try:
                reply = await self._prefill(run, attempt, token_w, hashes)
                assignment.kv_landed()
                if not run.sent:
                    run.job.cached_tokens = reply.num_cached_tokens
                if reply.finish_reason:
                    # Before the yield: a caller that has its last delta closes us right there. The prompt
                    # worker already dropped the transfer; this also frees KV that no Generate will claim.
                    finished = True
                    self._abort_later(token_w, rid)
                    yield Delta([reply.first_token], reply.first_text, reply.finish_reason)
                    return
                token_w.expect_cached(hashes.full(token_w.block_size))   # its decode keeps the prompt's blocks
                yield Delta([reply.first_token], reply.first_text)
                sampling = attempt.sampling
                request = pb.GenerateRequest(request_id=rid, sampling=sampling, first_token=reply.first_token)
                remaining = max(sampling.max_tokens - 1, 0)
                generating = True   # from here on `_generate` aborts the request on the token worker itself
                async with aclosing(self._generate(token_w, "token", request, remaining, attempt.job)) as events:
                    async for delta in events:
                        finished = decoded = bool(delta.finish_reason)
                        yield delta
            finally:
                if decoded:   # again: a poll begun before the decode started may not have reported the blocks
                    token_w.expect_cached(hashes.full(token_w.block_size))
                if not finished and not generating:
                    self._abort_later(token_w, rid)

    async def _prefill(self, run: RequestRun, attempt: Attempt, token_w: WorkerState,
                       hashes: PromptHashes) -> pb.PrefillReply:
        ids = attempt.prompt_token_ids
        prompt_w = self._pick_prompt_worker(run, hashes)
        request = pb.PrefillRequest(request_id=attempt.request_id, prompt_token_ids=ids, sampling=attempt.sampling,
                                    token_worker=token_w.address,
                                    token_cached_blocks=self._held_by_token_worker(run, token_w, hashes))
        to_compute = _to_compute(hashes, prompt_w)
        phase = self.metrics.phase("prompt", to_compute)
        with prompt_w.assign(attempt.request_id, prompt_tokens=to_compute):
            call = prompt_w.prompt.Prefill(request,
                                           metadata=prompt_w.metadata + (_log_metadata(attempt.job) or ()))
            try:
                reply = await call
            except grpc.aio.AioRpcError as e:
                lost = lost_in_prefill(e, prompt_w, token_w, request.token_cached_blocks)
                if isinstance(lost, WorkerLost) and not lost.blame:   # a cache miss: the next attempt sends every block
                    run.stale_caches.add(token_w.address)
                    token_w.forget_cached(hashes.full(token_w.block_size))
                raise lost from None
            except BaseException:   # cancelled before the worker answered
                call.cancel()
                self._abort_later(prompt_w, attempt.request_id)
                raise
            finally:
                phase.close()
        self._prompt_computed(prompt_w, hashes, reply.num_cached_tokens)
        run.prefill = (f"queue={reply.queue_seconds:.4f} prefill={reply.prefill_seconds:.4f} "
                       f"transfer={reply.transfer_seconds:.4f} kv_bytes={reply.kv_bytes}")
        self.metrics.kv_transfer_bytes.inc(reply.kv_bytes)
        self.metrics.kv_transfer_seconds.inc(reply.transfer_seconds)
        self.metrics.kv_blocks_sent.inc(reply.kv_blocks_sent)
        self.metrics.kv_blocks_held.inc(reply.kv_blocks_held)
        return reply

    @staticmethod
    def _held_by_token_worker(run: RequestRun, token_w: WorkerState, hashes: PromptHashes) -> int:
        """The prompt's leading blocks the router believes the token worker holds: the prompt worker sends only
        the rest. 0 once that worker lacked such blocks for this request (then every block moves)."""
        if token_w.address in run.stale_caches or not token_w.caches_prefixes:
            return 0
        return token_w.cache.cached_blocks(hashes.lookup(token_w.block_size))

    # ---- mixed: both phases on one worker ----
    async def _mixed(self, run: RequestRun, attempt: Attempt) -> AsyncIterator[Delta]:
        hashes = _prompt_hashes(attempt)
        worker = self._pick_mixed_worker(run, hashes)
        async with aclosing(self._both_phases(run, attempt, worker, "mixed", hashes)) as deltas:
            async for delta in deltas:
                yield delta

    async def _both_phases(self, run: RequestRun, attempt: Attempt, worker: WorkerState, pool: str,
                           hashes: PromptHashes) -> AsyncIterator[Delta]:
        """One Generate stream computes the prompt and decodes: on a mixed worker, or on a token worker
        whose cache holds all but a short tail of the prompt (conditional disaggregation)."""
        ids = attempt.prompt_token_ids
        request = pb.GenerateRequest(request_id=attempt.request_id, sampling=attempt.sampling, prompt_token_ids=ids)
        to_compute = _to_compute(hashes, worker)
        queued = to_compute if pool == "mixed" else attempt.sampling.max_tokens   # a token pool queues its output
        with worker.assign(attempt.request_id, prompt_tokens=to_compute) as assignment:
            async with aclosing(self._generate(worker, pool, request, queued, attempt.job)) as events:
                async for delta in events:
                    if assignment.prompt_tokens:
                        self._prompt_computed(worker, hashes, delta.cached_tokens)
                    assignment.prompt_done()
                    if not run.sent:
                        run.job.cached_tokens = delta.cached_tokens
                    yield delta

    # ---- one Generate stream ----
    async def _generate(self, worker: WorkerState, pool: str, request: pb.GenerateRequest,
                        queued_tokens: int, job: Job) -> AsyncIterator[Delta]:
        """Relays one Generate stream as deltas; the prompt's tokens count as queued (mixed) or the output still
        to come (token). Output starts with a token worker's first event, a mixed worker's second."""
        phase = self.metrics.phase(pool, queued_tokens)
        call = worker.token.Generate(request, metadata=worker.metadata + (_log_metadata(job) or ()))
        finished = False
        events = watch_stalls(aiter(call), self.policy.stall_timeout, started=pool == "token",
                              wait_on=self._waits_on(worker, request.request_id))
        try:
            async with aclosing(events):
                async for event in events:
                    phase.started()
                    phase.consume(len(event.token_ids) if pool == "token" else queued_tokens)
                    if event.finish_reason == "abort":
                        raise WorkerLost(worker, "worker_aborted", worker_failed(worker, "aborted the request"))
                    finished = bool(event.finish_reason)
                    yield Delta(list(event.token_ids), event.text, event.finish_reason, event.num_cached_tokens)
                    if finished:
                        return
            raise WorkerLost(worker, "stream_ended", worker_failed(worker, "ended the stream without a finish reason"))
        except Stalled:
            raise WorkerLost(worker, "stalled", worker_failed(
                worker, f"sent no token for {self.policy.stall_timeout:g} s"), down=True) from None
        except grpc.aio.AioRpcError as e:
            raise lost_in_stream(e, worker) from None
        finally:
            phase.close()
            if not finished:
                call.cancel()
                self._abort_later(worker, request.request_id)

    def _waits_on(self, worker: WorkerState, request_id: str):
        """Whether a stalled stream is waited on: when no other worker could take the request over and this one
        still answers its polls (a busy worker is slow, not lost)."""
        def wait_on(quiet_since: float) -> bool:
            if worker.answered_at <= quiet_since or self._elsewhere(worker):
                return False
            log.warning("request %s: worker %s sent no token for %g s; it still answers its polls and no other "
                        "worker could take the request: waiting on", request_id, worker.address,
                        time.monotonic() - quiet_since)
            return True
        return wait_on

    def _elsewhere(self, worker: WorkerState) -> bool:
        """Whether a route of other ready workers could take over a request `worker` runs."""
        def others(pool: str) -> bool:
            return any(w.routable and w is not worker for w in self.pools[pool].workers.values())
        return (others("prompt") or others("mixed")) and (others("token") or others("mixed"))

    def _abort_later(self, worker: WorkerState, request_id: str) -> None:
        """Abort in a task of its own: it must run even while the request's own task is being cancelled."""
        task = asyncio.get_running_loop().create_task(worker.abort(request_id))
        self._cleanup.add(task)
        task.add_done_callback(self._cleanup.discard)

    async def drain_cleanup(self) -> None:
        while self._cleanup:
            await asyncio.gather(*list(self._cleanup), return_exceptions=True)


def _prompt_hashes(attempt: Attempt) -> PromptHashes:
    sampling = attempt.sampling
    return PromptHashes(attempt.prompt_token_ids, sampling.cache_salt if sampling.HasField("cache_salt") else None)


def _cached(hashes: PromptHashes):
    """`cached(worker)` for the cache-aware picks: the prompt tokens the router believes the worker holds."""
    return lambda worker: worker.cached_tokens(hashes.lookup(worker.block_size))


def _to_compute(hashes: PromptHashes, worker: WorkerState) -> int:
    """The prompt tokens `worker` will compute, as far as the router knows its cache (at least one: a
    prompt cached whole still computes its last token). What the queue metrics and the load balance count."""
    return max(1, len(hashes.token_ids) - _cached(hashes)(worker))


def _log_metadata(job: Job) -> tuple[tuple[str, str], ...] | None:
    """The request's X-Request-Id for the worker's log lines about it."""
    return ((REQUEST_ID_METADATA, job.log_id),) if job.log_id else None
