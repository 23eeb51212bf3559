"""Continuous batching: waiting and running queues, a token budget per step, preemption by recompute.

Without chunked prefill a step is either a prefill (whole prompts, first) or a decode of every
running sequence. With it (stall-free batching) every step decodes the running sequences and fills
the rest of the budget with prompt chunks; a prompt longer than the budget runs over several steps.
Either way each scheduled sequence's `num_scheduled_tokens` says how many of its tokens the step
computes, from `num_cached_tokens` on: with prefix caching a sequence is admitted with the cached
blocks of its prefix, and its first step starts after them."""

from __future__ import annotations

from collections import deque

from phasesplit.engine.batching import take_chunks, take_prefill, take_ready
from phasesplit.engine.kv_cache import BlockManager
from phasesplit.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: set[int], chunked_prefill: bool = False):
        capacity = block_manager.num_blocks * block_manager.block_size
        if max_model_len > capacity:
            # Otherwise a lone sequence could outgrow the whole cache and wait forever.
            raise ValueError(f"max_model_len: {max_model_len} exceeds the KV cache ({capacity} tokens)")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.ready: deque[Sequence] = deque()  # K/V imported, waiting for a decode slot
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache (at first admission)
        self.prefix_cache_hits = 0  # of those, the tokens found cached

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
        """The next batch and whether it computes prompt tokens."""
        if self.chunked_prefill:
            return self._schedule_mixed()
        seqs = self._schedule_prefill()
        if seqs:
            return _scheduled(seqs, lambda seq: seq.num_uncached_tokens), True
        self.running.extend(take_ready(self.ready, len(self.running), self.max_num_seqs))
        return _scheduled(self._schedule_decode(), lambda seq: 1), False

    def _schedule_mixed(self) -> tuple[list[Sequence], bool]:
        """Every running sequence's next token first (preempting the newest while blocks run out), then
        prompt chunks up to the token budget."""
        self.running.extend(take_ready(self.ready, len(self.running), self.max_num_seqs))
        running = self._schedule_decode()
        decodes = [seq for seq in running if seq.num_uncached_tokens == 1]
        started = [seq for seq in running if seq.num_uncached_tokens > 1]
        chunks = take_chunks(started, self.waiting, self.max_num_batched_tokens - len(decodes),
                             self.max_num_seqs - len(self.running), self.tokens_to_compute, self._admit,
                             lambda seq: True, self._chunk_unit)
        self.running.extend(seq for seq, _ in chunks if seq not in started)  # the newly admitted
        for seq in decodes:
            seq.num_scheduled_tokens = 1
        for seq, n in chunks:
            seq.num_scheduled_tokens = n
        return decodes + [seq for seq, _ in chunks], bool(chunks)

    def _chunk_unit(self, seq: Sequence) -> int:
        """A prefill-only prompt's KV moves chunk by chunk: its chunks end on block boundaries."""
        return self.block_manager.block_size if seq.prefill_only else 1

    def _schedule_prefill(self) -> list[Sequence]:
        seqs = take_prefill(self.waiting, self.max_num_batched_tokens, self.max_num_seqs - len(self.running),
                            self.tokens_to_compute, self._admit)
        self.running.extend(seqs)
        return seqs

    def tokens_to_compute(self, seq: Sequence) -> int:
        """The tokens of `seq` that steps still have to compute: a waiting one's less its cached prefix."""
        if seq.status is SequenceStatus.WAITING:
            return seq.num_tokens - self.block_manager.num_cached_prefix_tokens(seq)
        return seq.num_uncached_tokens

    def _admit(self, seq: Sequence) -> bool:
        if not self.block_manager.can_allocate(seq):
            return False
        self.block_manager.allocate(seq)
        seq.status = SequenceStatus.RUNNING
        if seq.num_prefix_cached_tokens is None:  # not on a preempted sequence's return
            seq.num_prefix_cached_tokens = seq.num_cached_tokens
            if self.block_manager.prefix_caching:
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += seq.num_cached_tokens
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

    def postprocess(self, seqs: list[Sequence], token_ids: list[int | None]) -> None:
        """`token_ids`: each sequence's next token, None for a prompt chunk that is not its last."""
        for seq, token_id in zip(seqs, token_ids):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted during the step (e.g. from a layer hook)
            seq.num_cached_tokens += seq.num_scheduled_tokens
            self.block_manager.cache_full_blocks(seq)
            if token_id is None:
                continue
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


def _scheduled(seqs: list[Sequence], num_tokens) -> list[Sequence]:
    for seq in seqs:
        seq.num_scheduled_tokens = num_tokens(seq)
    return seqs
