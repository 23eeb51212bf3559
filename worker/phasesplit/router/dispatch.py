"""One request through the pools: prefill on a prompt worker, decode on a token worker (or both on a mixed one)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

import grpc

from phasesplit.v1.conventions import KV_PEER_FAILED
from phasesplit.router.lending import prompt_candidates, token_candidates
from phasesplit.router.metrics import RouterMetrics
from phasesplit.router.openai_api import APIError, unavailable
from phasesplit.router.pools import Pools
from phasesplit.router.waiting import EmptyPoolQueue, QueueSettings
from phasesplit.router.scheduling import pick_mixed_worker, pick_prompt_worker, pick_token_worker
from phasesplit.router.workers import WorkerState
from phasesplit.v1 import worker_pb2 as pb

log = logging.getLogger(__name__)


@dataclass
class Job:
    request_id: str
    prompt_token_ids: list[int]
    sampling: pb.SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    tokenizer: str = ""   # digest of the tokenizer that made prompt_token_ids ("": not known)


class TokenizerChanged(Exception):
    """The workers now read token ids with another tokenizer than the job's: tokenize it again."""


@dataclass
class Delta:
    token_ids: list[int]
    text: str
    finish_reason: str = ""


@dataclass
class Timing:
    route: str = ""
    prompt_worker: str = ""
    token_worker: str = ""
    first_token: float | None = None
    last_token: float | None = None
    completion_tokens: int = 0
    prefill: str = "-"   # the prompt worker's own queue/prefill/transfer seconds
    failed: list[str] = field(default_factory=list)   # "worker (reason)" for each worker that failed the request


@dataclass(frozen=True)
class MigrationPolicy:
    max_attempts: int = 3          # migrations per request once output has started; 0 turns migration off
    stall_timeout: float = 30.0    # seconds without a token, once output has started, before a worker counts as stalled
    retries_before_output: int = 2


@dataclass(frozen=True)
class Attempt:
    """One run of a job on workers: after `sent` tokens reached the client, the prompt phase covers them too."""
    job: Job
    sent: tuple[int, ...]
    number: int

    @property
    def request_id(self) -> str:
        """A new id on every attempt: a worker that saw an earlier attempt aborted refuses that id for a while."""
        return self.job.request_id if self.number == 0 else f"{self.job.request_id}~{self.number}"

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.job.prompt_token_ids + list(self.sent)

    @property
    def sampling(self) -> pb.SamplingParams:
        sampling = pb.SamplingParams()
        sampling.CopyFrom(self.job.sampling)
        sampling.max_tokens = self.job.sampling.max_tokens - len(self.sent)
        return sampling


def worker_error(e: grpc.aio.AioRpcError, worker: WorkerState) -> APIError:
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return APIError(400, details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return unavailable(f"worker {worker.address} cannot take the request: {code.name}: {details}")
    return APIError(502, f"worker {worker.address} failed: {code.name}: {details}", type="server_error",
                    code="worker_error")


class WorkerLost(Exception):
    """A worker failed a request in a way another worker can take over. `down`: it looks dead or stalled."""

    def __init__(self, worker: WorkerState, reason: str, error: APIError, down: bool = False):
        super().__init__(error.message)
        self.worker, self.reason, self.error, self.down = worker, reason, error, down


def lost_in_stream(e: grpc.aio.AioRpcError, worker: WorkerState) -> WorkerLost | APIError:
    """What a failed Generate means: the request's own fault (an APIError) or the worker's."""
    code = e.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return worker_error(e, worker)
    if code == grpc.StatusCode.UNAVAILABLE:
        return WorkerLost(worker, "worker_unavailable", worker_error(e, worker), down=True)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return WorkerLost(worker, "worker_full", worker_error(e, worker))
    return WorkerLost(worker, "worker_error", worker_error(e, worker))


class Dispatcher:
    def __init__(self, pools: Pools, metrics: RouterMetrics, policy: MigrationPolicy = MigrationPolicy(),
                 queue: QueueSettings = QueueSettings()):
        self.pools, self.metrics, self.policy = pools, metrics, policy
        self.queue = EmptyPoolQueue(pools, metrics, queue)
        self._cleanup: set[asyncio.Task] = set()

    async def run(self, job: Job) -> AsyncIterator[Delta]:
        """Yields the request's output; closing the iterator early cancels the request on every worker."""
        try:
            route = await self.queue.route(len(job.prompt_token_ids), job.sampling.max_tokens)
        except APIError:
            self.metrics.requests.labels(outcome="rejected").inc()
            raise
        if self._tokenizer_changed(job):
            raise TokenizerChanged(job.request_id)
        timing, outcome = Timing(route=route), "error"
        try:
            async with aclosing(self._resilient(job, timing)) as steps:
                async for delta in steps:
                    self._observe(job, timing, delta)
                    if delta.finish_reason:
                        outcome = "success"   # even if the caller closes us right after this last delta
                    yield delta
        except (asyncio.CancelledError, GeneratorExit):
            if outcome != "success":
                outcome = "cancelled"
            raise
        finally:
            self.metrics.requests.labels(outcome=outcome).inc()
            elapsed = time.monotonic() - job.arrival
            if outcome == "success":
                self.metrics.latency.observe(elapsed)
            log.log(logging.INFO if timing.failed else logging.DEBUG,
                    "request %s %s route=%s prompt_worker=%s token_worker=%s failed_workers=[%s] prompt_tokens=%d "
                    "completion_tokens=%d ttft=%s e2e=%.4f prompt_phase=[%s]", job.request_id, outcome, timing.route,
                    timing.prompt_worker, timing.token_worker, ", ".join(timing.failed), len(job.prompt_token_ids),
                    timing.completion_tokens,
                    f"{timing.first_token - job.arrival:.4f}" if timing.first_token else "-", elapsed,
                    timing.prefill)

    def _observe(self, job: Job, timing: Timing, delta: Delta) -> None:
        n = len(delta.token_ids)
        if not n:
            return
        now = time.monotonic()
        if timing.first_token is None:
            timing.first_token = timing.last_token = now
            self.metrics.ttft.observe(now - job.arrival)
            n -= 1
        if n:   # tokens held back with an incomplete character arrive together with the next text
            for _ in range(n):
                self.metrics.tbt.observe((now - timing.last_token) / n)
        timing.last_token = now
        timing.completion_tokens += len(delta.token_ids)

    # ---- attempts: retries before output, migrations after ----
    async def _resilient(self, job: Job, timing: Timing) -> AsyncIterator[Delta]:
        """Runs attempts until one finishes. Tokens whose text is still held back (an incomplete character)
        are passed on with the next text: the client has seen none of them, so a migration runs them again."""
        sent: list[int] = []
        failed: set[str] = set()
        retries = migrations = 0
        failed_at: float | None = None
        while True:
            if failed and self._tokenizer_changed(job):   # a migration during a rollout: the ids mean nothing here
                self._lose(sent, timing)
                raise unavailable(f"the request lost its worker ({timing.failed[-1]}) and the workers left read "
                                  "another tokenizer (a rollout): send it again")
            attempt = Attempt(job, tuple(sent), retries + migrations)
            route = self.pools.route()
            if route is None and failed:
                self._lose(sent, timing)
                raise unavailable(f"the request lost its worker ({timing.failed[-1]}) and no other can take it: "
                                  f"{self.pools.why_not()}")
            timing.route = route or timing.route
            held: list[int] = []
            steps = self._split(attempt, failed, timing) if timing.route == "split" else self._mixed(attempt, failed,
                                                                                                      timing)
            try:
                async with aclosing(steps):
                    async for delta in steps:
                        held += delta.token_ids
                        if not delta.text and not delta.finish_reason:
                            continue
                        if failed_at is not None:
                            self.metrics.resume.observe(time.monotonic() - failed_at)
                            failed_at = None
                        sent += held
                        yield Delta(held, delta.text, delta.finish_reason)
                        held = []
                return
            except WorkerLost as lost:
                stage = "mid_stream" if sent else "before_output"
                failed.add(lost.worker.address)
                timing.failed.append(f"{lost.worker.address} ({lost.reason})")
                if lost.down:
                    lost.worker.mark_down(f"failed request {attempt.request_id}: {lost.reason}")
                allowed = self.policy.max_attempts if sent else self.policy.retries_before_output
                used = migrations if sent else retries
                if used >= allowed:
                    self._lose(sent, timing)
                    raise lost.error from None
                if sent:
                    migrations += 1
                else:
                    retries += 1
                self.metrics.migrations.labels(reason=lost.reason, stage=stage).inc()
                failed_at = failed_at or time.monotonic()
                log.warning("request %s: %s worker %s failed it (%s: %s) after %d tokens; %s",
                            job.request_id, lost.worker.pool, lost.worker.address, lost.reason, lost.error.message,
                            len(sent), "migrating" if sent else "retrying")
            except APIError:
                if failed:
                    self._lose(sent, timing)
                raise

    def _tokenizer_changed(self, job: Job) -> bool:
        """Whether the workers now routable read token ids with another tokenizer than the job's."""
        current = self.pools.tokenizer.digest if self.pools.tokenizer else ""
        return bool(job.tokenizer and current and job.tokenizer != current)

    def _lose(self, sent: list[int], timing: Timing) -> None:
        self.metrics.lost.labels(stage="mid_stream" if sent else "before_output").inc()
        log.error("request lost after %d tokens; workers that failed it: %s", len(sent), ", ".join(timing.failed))

    # ---- split: prompt worker then token worker ----
    async def _split(self, attempt: Attempt, failed: set[str], timing: Timing) -> AsyncIterator[Delta]:
        n = len(attempt.prompt_token_ids)
        token_w = pick_token_worker(token_candidates(self.pools["token"].workers.values(),
                                                     self.pools["mixed"].workers.values(), n + 1),
                                    exclude=failed, tokens=n + 1)
        if token_w is None:
            raise unavailable("no token worker is ready" + (f" (failed: {', '.join(sorted(failed))})" if failed else ""))
        if timing.token_worker and token_w.address != timing.token_worker:
            log.info("request %s: token worker %s -> %s", attempt.job.request_id, timing.token_worker, token_w.address)
        timing.token_worker = token_w.address
        rid = attempt.request_id
        token_w.reserve(rid, math.ceil((n + 1) / token_w.block_size))
        token_w.inflight += 1
        finished = False
        try:
            reply = await self._prefill(attempt, token_w, failed, timing)
            token_w.settle(rid)
            if reply.finish_reason:
                # Before the yield: a caller that has its last delta closes us right there. The prompt
                # worker already dropped the transfer; this also frees KV that no Generate will claim.
                finished = True
                self._abort_later(token_w, rid)
                yield Delta([reply.first_token], reply.first_text, reply.finish_reason)
                return
            yield Delta([reply.first_token], reply.first_text)
            sampling = attempt.sampling
            remaining = max(sampling.max_tokens - 1, 0)
            request = pb.GenerateRequest(request_id=rid, sampling=sampling, first_token=reply.first_token)
            async with aclosing(self._generate(token_w, "token", request, remaining)) as events:
                async for delta in events:
                    finished = bool(delta.finish_reason)
                    yield delta
        finally:
            token_w.inflight -= 1
            token_w.unreserve(rid)
            if not finished:
                self._abort_later(token_w, rid)

    async def _prefill(self, attempt: Attempt, token_w: WorkerState, failed: set[str],
                       timing: Timing) -> pb.PrefillReply:
        ids = attempt.prompt_token_ids
        n = len(ids)
        prompt_w = pick_prompt_worker(prompt_candidates(self.pools["prompt"].workers.values(),
                                                       self.pools["mixed"].workers.values()), exclude=failed)
        if prompt_w is None:
            raise unavailable("no prompt worker is ready" + (f" (failed: {', '.join(sorted(failed))})" if failed else ""))
        timing.prompt_worker = prompt_w.address
        request = pb.PrefillRequest(request_id=attempt.request_id, prompt_token_ids=ids, sampling=attempt.sampling,
                                    token_worker=token_w.address)
        phase = self.metrics.phase("prompt", n)
        prompt_w.pending_tokens += n
        prompt_w.inflight += 1
        answered = False
        call = prompt_w.prompt.Prefill(request)
        try:
            reply = await call
            answered = True
        except grpc.aio.AioRpcError as e:
            answered = True
            if any(key == KV_PEER_FAILED for key, _ in e.trailing_metadata() or ()):
                raise WorkerLost(token_w, "kv_transfer_failed", worker_error(e, token_w)) from None
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise WorkerLost(prompt_w, "prompt_worker_unavailable", worker_error(e, prompt_w),
                                 down=True) from None
            raise worker_error(e, prompt_w) from None
        finally:
            phase.close()
            prompt_w.pending_tokens -= n
            prompt_w.inflight -= 1
            if not answered:
                call.cancel()
                self._abort_later(prompt_w, attempt.request_id)
        timing.prefill = (f"queue={reply.queue_seconds:.4f} prefill={reply.prefill_seconds:.4f} "
                          f"transfer={reply.transfer_seconds:.4f} kv_bytes={reply.kv_bytes}")
        self.metrics.kv_transfer_bytes.inc(reply.kv_bytes)
        self.metrics.kv_transfer_seconds.inc(reply.transfer_seconds)
        return reply

    # ---- mixed: both phases on one worker ----
    async def _mixed(self, attempt: Attempt, failed: set[str], timing: Timing) -> AsyncIterator[Delta]:
        ids = attempt.prompt_token_ids
        worker = pick_mixed_worker(self.pools["mixed"].workers.values(), exclude=failed)
        if worker is None:
            raise unavailable("no mixed worker is ready" + (f" (failed: {', '.join(sorted(failed))})" if failed else ""))
        timing.prompt_worker = timing.token_worker = worker.address
        request = pb.GenerateRequest(request_id=attempt.request_id, sampling=attempt.sampling, prompt_token_ids=ids)
        worker.pending_tokens += len(ids)
        worker.inflight += 1
        started = False
        try:
            async with aclosing(self._generate(worker, "mixed", request, len(ids))) as events:
                async for delta in events:
                    if not started:
                        started = True
                        worker.pending_tokens -= len(ids)
                    yield delta
        finally:
            worker.inflight -= 1
            if not started:
                worker.pending_tokens -= len(ids)

    async def _generate(self, worker: WorkerState, pool: str, request: pb.GenerateRequest,
                        queued_tokens: int) -> AsyncIterator[Delta]:
        """Relays one Generate stream; the prompt's tokens count as queued (mixed) or the output still to come (token).
        Once output has started (a token worker's first event, a mixed worker's second), an event must come
        within the stall timeout, unless no other worker could take the request over and this one still
        answers its polls: then the router waits on (a busy worker is slow, not lost)."""
        phase = self.metrics.phase(pool, queued_tokens)
        call = worker.token.Generate(request)
        events = aiter(call)
        finished = False
        output_started = pool == "token"
        quiet_since = time.monotonic()
        next_event: asyncio.Future | None = None   # kept across a stall we wait out: cancelling it ends the stream
        try:
            while True:
                next_event = next_event or asyncio.ensure_future(anext(events))
                done, _ = await asyncio.wait([next_event], timeout=self.policy.stall_timeout if output_started else None)
                if not done:
                    if worker.answered_at > quiet_since and not self._elsewhere(worker):
                        log.warning("request %s: worker %s sent no token for %g s; it still answers its polls and "
                                    "no other worker could take the request: waiting on", request.request_id,
                                    worker.address, time.monotonic() - quiet_since)
                        quiet_since = time.monotonic()
                        continue
                    raise WorkerLost(worker, "stalled", APIError(
                        502, f"worker {worker.address} sent no token for {self.policy.stall_timeout:g} s",
                        type="server_error", code="worker_error"), down=True)
                arrived, next_event = next_event, None
                try:
                    event = arrived.result()
                except StopAsyncIteration:
                    raise WorkerLost(worker, "stream_ended", APIError(
                        502, f"worker {worker.address} ended the stream without a finish reason",
                        type="server_error", code="worker_error")) from None
                quiet_since = time.monotonic()
                output_started = True
                phase.started()
                phase.consume(len(event.token_ids) if pool == "token" else queued_tokens)
                if event.finish_reason == "abort":
                    raise WorkerLost(worker, "worker_aborted", APIError(
                        502, f"worker {worker.address} aborted the request", type="server_error", code="worker_error"))
                finished = bool(event.finish_reason)
                yield Delta(list(event.token_ids), event.text, event.finish_reason)
                if finished:
                    return
        except grpc.aio.AioRpcError as e:
            raise lost_in_stream(e, worker) from None
        finally:
            if next_event is not None:
                next_event.cancel()
            phase.close()
            if not finished:
                call.cancel()
                self._abort_later(worker, request.request_id)

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
