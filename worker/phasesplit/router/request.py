"""One request as the router runs it: the job, its attempts on workers, and what it has sent so far."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from phasesplit.v1 import worker_pb2 as pb


@dataclass
class Job:
    request_id: str
    prompt_token_ids: list[int]
    sampling: pb.SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    tokenizer: str = ""   # digest of the tokenizer that made prompt_token_ids ("": not known)
    log_id: str = ""      # the X-Request-Id, which the router's and the workers' log lines about the job carry
    completion_tokens: int = 0   # sent to the client so far
    cached_tokens: int = 0   # prompt tokens the prompt phase that gave the output found in a prefix cache


@dataclass
class Delta:
    token_ids: list[int]
    text: str
    finish_reason: str = ""
    cached_tokens: int = 0   # a mixed worker's: the prompt tokens it found in its prefix cache


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


@dataclass
class RequestRun:
    """A job's run until it finishes or is lost (as vLLM's `Request`): its attempts (retries before output,
    migrations after), the tokens sent to the client and those held back, the workers it was given and
    those that failed it, and its timing."""
    job: Job
    policy: MigrationPolicy
    route: str = ""
    prompt_worker: str = ""
    token_worker: str = ""
    prompt_pool: str = ""    # the pools of those workers (a mixed worker may lend itself to either phase)
    token_pool: str = ""
    sent: list[int] = field(default_factory=list)    # tokens whose text reached the client
    held: list[int] = field(default_factory=list)    # this attempt's tokens whose text is held back
    failed: set[str] = field(default_factory=set)    # addresses of the workers that failed it
    stale_caches: set[str] = field(default_factory=set)   # token workers that lacked blocks said to be cached
    failures: list[str] = field(default_factory=list)   # "worker (reason)" for each failure
    retries: int = 0
    migrations: int = 0
    failed_at: float | None = None      # when the failure it has not yet recovered from happened
    first_token: float | None = None
    last_token: float | None = None
    completion_tokens: int = 0
    prefill: str = "-"   # the prompt worker's own queue/prefill/transfer seconds

    @property
    def stage(self) -> str:
        return "mid_stream" if self.sent else "before_output"

    def next_attempt(self) -> Attempt:
        """The next attempt; the tokens an earlier one held back were never sent, so it runs them again."""
        self.held = []
        return Attempt(self.job, tuple(self.sent), len(self.failures))   # a new request id after each failure

    def release(self, delta: Delta) -> Delta | None:
        """What the client gets of `delta` now: held tokens pass on with the next text (None: no text yet)."""
        self.held += delta.token_ids
        if not delta.text and not delta.finish_reason:
            return None
        released, self.held = Delta(self.held, delta.text, delta.finish_reason), []
        self.sent += released.token_ids
        return released

    def recovered(self) -> float | None:
        """Seconds from the failure the run has just recovered from to now (None: it was not recovering)."""
        if self.failed_at is None:
            return None
        seconds, self.failed_at = time.monotonic() - self.failed_at, None
        return seconds

    def fail(self, address: str, reason: str, blame: bool = True) -> bool:
        """Records a worker failing the run; whether the policy allows another attempt (then it is counted).
        Without `blame` (a token worker that no longer held the blocks it was said to hold: the next attempt
        sends it every block) the worker may take the next attempt, and that attempt is not counted."""
        self.failures.append(f"{address} ({reason})")
        if not blame:
            return True
        self.failed.add(address)
        if self.sent:
            if self.migrations >= self.policy.max_attempts:
                return False
            self.migrations += 1
        else:
            if self.retries >= self.policy.retries_before_output:
                return False
            self.retries += 1
        self.failed_at = self.failed_at or time.monotonic()
        return True
