"""Continuous batching: waiting and running queues, a prefill token budget, preemption by recompute."""

from __future__ import annotations

from collections import deque

from phasesplit.engine.batching import take_prefill, take_ready
from phasesplit.engine.kv_cache import BlockManager
from phasesplit.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: set[int]):
        capacity = block_manager.num_blocks * block_manager.block_size
        if max_model_len > capacity:
            # Otherwise a lone sequence could outgrow the whole cache and wait forever.
            raise ValueError(f"max_model_len: {max_model_len} exceeds the KV cache ({capacity} tokens)")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.ready: deque[Sequence] = deque()  # K/V imported, waiting for a decode slot
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_ready(self, seq: Sequence) -> None:
        """A sequence whose prompt K/V are already in its blocks: it decodes once a slot is free."""
        seq.status = SequenceStatus.RUNNING
        self.ready.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.ready)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The next batch and whether it is a prefill. Prefill goes first; otherwise every running
        sequence decodes, preempting the newest ones while blocks run out."""
        seqs = self._schedule_prefill()
        if seqs:
            return seqs, True
        self.running.extend(take_ready(self.ready, len(self.running), self.max_num_seqs))
        return self._schedule_decode(), False

    def _schedule_prefill(self) -> list[Sequence]:
        seqs = take_prefill(self.waiting, self.max_num_batched_tokens, self.max_num_seqs - len(self.running),
                            lambda seq: seq.num_tokens, self._admit)
        self.running.extend(seqs)
        return seqs

    def _admit(self, seq: Sequence) -> bool:
        if not self.block_manager.can_allocate(seq):
            return False
        self.block_manager.allocate(seq)
        seq.status = SequenceStatus.RUNNING
        return True

    def _schedule_decode(self) -> list[Sequence]:
        seqs: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self.preempt(self.running.pop())
                else:
                    self.preempt(seq)
                    break
            else:
                self.block_manager.may_append(seq)
                seqs.append(seq)
        self.running.extend(seqs)
        return seqs

    def preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks; it is prefilled again (prompt and output so far) later."""
        self.block_manager.deallocate(seq)
        seq.num_cached_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(self, seqs: list[Sequence], token_ids: list[int]) -> None:
        for seq, token_id in zip(seqs, token_ids):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted during the step (e.g. from a layer hook)
            seq.num_cached_tokens = seq.num_tokens
            seq.append_token(token_id)
            seq.finish_reason = self.finish_reason(seq, token_id)
            if seq.finish_reason or seq.prefill_only:
                self.finish(seq)

    def finish_reason(self, seq: Sequence, token_id: int) -> str | None:
        """Why `seq` ends after `token_id` was appended (EOS or its length), or None."""
        if token_id in self.eos_token_ids and not seq.params.ignore_eos:
            return "stop"
        if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def finish(self, seq: Sequence) -> None:
        """A running sequence ends: a prefill-only one keeps its blocks for the handoff."""
        self.running.remove(seq)
        if seq.prefill_only:
            seq.status = SequenceStatus.HELD
        else:
            seq.status = SequenceStatus.FINISHED
            self.block_manager.deallocate(seq)

    def abort(self, seq: Sequence) -> None:
        for queue in (self.waiting, self.running, self.ready):
            if seq in queue:
                queue.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"
