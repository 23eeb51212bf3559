"""`LLMEngine`: the API the worker roles call (add a request, step, abort) and its KV connector: what
a KV handoff reads and writes (a request's blocks, a layer's K/V, reserve/commit/release, a per-layer
hook, and messages to the other tensor-parallel ranks)."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable

import torch
from torch import Tensor

from phasesplit.engine.config import EngineConfig
from phasesplit.engine.handoff import KVHandoff
from phasesplit.engine.kv_cache import BlockManager, KVCache, KVCapacityError, KVLayout, bytes_per_block
from phasesplit.engine.loader import load_model, resolve_dtype
from phasesplit.engine.parallel import TensorParallel
from phasesplit.engine.postprocess import detokenize, postprocess
from phasesplit.engine.runner import ForwardBatch, ModelRunner
from phasesplit.engine.sampler import SamplingParams, sample
from phasesplit.engine.scheduler import Scheduler
from phasesplit.engine.sequence import Sequence, SequenceStatus, take_text
from phasesplit.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from phasesplit.transport.layout import dtype_name

log = logging.getLogger(__name__)

__all__ = ["EngineConfig", "EngineStats", "KVCapacityError", "KVHandoff", "KVLayout", "LLMEngine",
           "SamplingParams", "StepOutput"]

CPU_KV_BYTES = 512 * 2**20  # default KV pool on CPU, where free memory is not a meaningful budget


@dataclasses.dataclass(slots=True)
class StepOutput:
    request_id: str
    token_ids: list[int]  # the tokens this step produced for the request (usually one)
    text: str  # the detokenized text they add
    finished: bool
    # "stop" | "length" | "abort"; None while running, and for a prefill-only request that
    # finished here but continues elsewhere.
    finish_reason: str | None
    num_cached_tokens: int = 0  # the request's prompt tokens found in the prefix cache, not computed


@dataclasses.dataclass(frozen=True, slots=True)
class EngineStats:
    waiting_requests: int
    waiting_tokens: int  # prompt tokens still to prefill (of waiting requests and of prompts begun in chunks)
    running_requests: int
    held_requests: int  # prefill-only requests whose blocks await export
    reserved_requests: int  # blocks reserved for KV arriving from a prompt worker
    pending_output_tokens: int  # at most this many tokens are still to generate
    used_blocks: int
    free_blocks: int
    total_blocks: int
    num_preemptions: int
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache, since the start
    prefix_cache_hits: int = 0  # of those, the tokens found cached


class LLMEngine:
    """With tensor parallelism every rank builds one (its shard of the model and of the KV cache);
    rank 0 is the engine the worker calls, the other ranks call `follow()` and run what it schedules."""

    def __init__(self, config: EngineConfig, tp: TensorParallel = TensorParallel()):
        self.config = config
        self.tp = tp
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.dtype)
        self.model_config, self.model = load_model(config.model_dir, self.dtype, self.device, tp)
        self.tokenizer = Tokenizer.from_dir(config.model_dir)
        mc = self.model_config
        self.layout = KVLayout(
            model=config.served_model_name or os.path.basename(os.path.normpath(config.model_dir)),
            dtype=dtype_name(self.dtype), num_layers=mc.num_layers,
            num_kv_heads=len(self.model.shard.kv_heads), head_dim=mc.head_dim, block_size=config.block_size,
            tensor_parallel_size=tp.size, tensor_parallel_rank=tp.rank)
        model_limit = min(mc.max_position_embeddings, mc.sliding_window or mc.max_position_embeddings)
        if config.max_model_len is not None and config.max_model_len > model_limit:
            raise ValueError(f"max_model_len: got {config.max_model_len}, the model allows at most {model_limit}")
        self.max_model_len = config.max_model_len or model_limit
        num_blocks = tp.min_over_ranks(self._num_kv_blocks())
        self.max_model_len = min(self.max_model_len, num_blocks * config.block_size)
        log.info("allocating the KV cache: %d blocks of %d tokens", num_blocks, config.block_size)
        self.kv_cache = KVCache(self.layout, num_blocks, self.dtype, self.device)
        self.runner = ModelRunner(self.model, self.kv_cache, config.block_size, self.device)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.prefix_caching)
        eos = set(mc.eos_token_ids) | set(self.tokenizer.eos_token_ids)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, eos, config.chunked_prefill)
        self.requests: dict[str, Sequence] = {}
        self.reserved: dict[str, list[int]] = {}
        self.pending: list[StepOutput] = []

    @property
    def layer_hook(self) -> Callable[[int, list[str]], None] | None:
        """Called after each layer of a prefill batch wrote its K/V: hook(layer, request_ids)."""
        return self.runner.layer_hook

    @layer_hook.setter
    def layer_hook(self, hook: Callable[[int, list[str]], None] | None) -> None:
        self.runner.layer_hook = hook

    def follow(self, on_message: Callable[[object], None] | None = None) -> None:
        """Ranks other than 0: run the batches rank 0 broadcasts, and hand each message it sends
        (`send_to_ranks`) to `on_message`, until `close()`."""
        self.runner.follow(on_message)

    def close(self) -> None:
        """Rank 0: let the other ranks' `follow()` return."""
        self.runner.stop_followers()

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            if cfg.max_model_len is not None and cfg.num_kv_blocks * cfg.block_size < cfg.max_model_len:
                raise ValueError(f"num_kv_blocks: {cfg.num_kv_blocks} blocks of {cfg.block_size} tokens cannot hold "
                                 f"one sequence of max_model_len={cfg.max_model_len}")
            return cfg.num_kv_blocks
        per_block = bytes_per_block(self.layout, self.dtype)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(1, int(free * cfg.kv_memory_fraction) // per_block)
        blocks_per_seq = -(-self.max_model_len // cfg.block_size)
        return max(blocks_per_seq, min(CPU_KV_BYTES // per_block, cfg.max_num_seqs * blocks_per_seq))

    # ---- requests ----

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prefill_only: bool = False) -> None:
        seq = self._new_sequence(request_id, prompt_token_ids, params, prefill_only)
        self.requests[request_id] = seq
        self.scheduler.add(seq)

    def _new_sequence(self, request_id, prompt_token_ids, params, prefill_only=False) -> Sequence:
        self._check_new_id(request_id)
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: got {type(params).__name__}, must be SamplingParams")
        ids = list(prompt_token_ids)
        vocab = self.model_config.vocab_size
        if not ids or not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt: must be a non-empty list of token ids in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens is too long: max_model_len is {self.max_model_len} "
                             "(prompt plus at least one generated token)")
        return Sequence(request_id, ids, params, IncrementalDetokenizer(self.tokenizer, ids), prefill_only)

    def _check_new_id(self, request_id: str) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id: got {request_id!r}, must be a non-empty string")
        if request_id in self.requests or request_id in self.reserved:
            raise ValueError(f"request_id: {request_id!r} is already in use")

    def abort(self, request_id: str) -> bool:
        if request_id in self.reserved:
            return self.release(request_id)
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.abort(seq)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.pending)

    @property
    def num_used_blocks(self) -> int:
        return self.block_manager.num_used_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.block_manager.num_blocks

    def stats(self) -> EngineStats:
        s = self.scheduler
        live = [*s.waiting, *s.running, *s.ready]
        return EngineStats(
            waiting_requests=len(s.waiting),
            waiting_tokens=sum(s.tokens_to_compute(seq) for seq in s.waiting)
            + sum(seq.num_uncached_tokens - 1 for seq in s.running),  # and the rest of prompts begun in chunks
            running_requests=len(s.running) + len(s.ready),
            held_requests=sum(seq.status is SequenceStatus.HELD for seq in self.requests.values()),
            reserved_requests=len(self.reserved),
            pending_output_tokens=sum(seq.params.max_tokens - seq.num_output_tokens for seq in live),
            used_blocks=self.num_used_blocks, free_blocks=self.num_free_blocks,
            total_blocks=self.num_total_blocks, num_preemptions=s.num_preemptions,
            prefix_cache_queries=s.prefix_cache_queries, prefix_cache_hits=s.prefix_cache_hits)

    # ---- the KV connector: what a handoff reads and writes ----

    def handoff(self, request_id: str) -> KVHandoff:
        """What the prompt phase of `request_id` hands on (its first token, once sampled)."""
        seq = self._holding(request_id)
        first = seq.output_token_ids[0] if seq.num_output_tokens else None
        return KVHandoff.of_prompt(request_id, seq.prompt_token_ids, self.layout, seq.params.cache_salt, first)

    def blocks_of(self, request_id: str) -> list[int]:
        """The cache blocks holding the request's KV, in its token order."""
        return list(self._holding(request_id).block_table)

    def _holding(self, request_id: str) -> Sequence:
        seq = self.requests.get(request_id)
        if seq is None or not seq.block_table:
            raise ValueError(f"request_id: {request_id!r} holds no KV blocks")
        return seq

    def prefill_piece(self, request_id: str, since: int | None = None) -> tuple[int, list[int]]:
        """Any rank, inside `layer_hook`: the blocks the running prefill (or chunk of it) writes the
        request's KV to, as (position of the first in the request's blocks, block ids); with `since`,
        every block from that position on (a sender that has not sent the cached prefix yet)."""
        return self.runner.batch.prefill_piece(request_id, self.config.block_size, since)

    def kv_layer(self, layer: int) -> tuple[Tensor, Tensor]:
        """Views of one layer's whole K and V cache: [num_blocks, block_size, num_kv_heads, head_dim] each."""
        return self.kv_cache.blocks(layer)

    def send_to_ranks(self, message) -> None:
        """Rank 0: every other rank's `follow` hands `message` (a small dataclass: all that crosses) to
        its `on_message`, in order with the batches. Nothing happens without tensor parallelism."""
        if self.tp.size > 1:
            self.tp.broadcast(message)

    def is_reserved(self, request_id: str) -> bool:
        return request_id in self.reserved

    def release(self, request_id: str) -> bool:
        """Free the blocks of a prefill-only request or of a reservation."""
        if request_id in self.reserved:
            self.block_manager.free(self.reserved.pop(request_id))
            return True
        seq = self.requests.get(request_id)
        if seq is None or seq.status is not SequenceStatus.HELD:
            return False
        del self.requests[request_id]
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.FINISHED
        return True

    def reserve_kv(self, request_id: str, num_tokens: int, cached_hashes: list[int] = ()) -> list[int]:
        """Blocks to receive `num_tokens` tokens of prompt KV; raises KVCapacityError when full. The first
        ones are the cached blocks of `cached_hashes` (the prompt's leading block hashes, which the sender
        does not send), shared; raises CachedPrefixGone when the cache no longer holds them all."""
        self._check_new_id(request_id)
        if not isinstance(num_tokens, int) or not 0 < num_tokens < self.max_model_len:
            raise ValueError(f"num_tokens: got {num_tokens!r}, must be in [1, {self.max_model_len - 1}]")
        num_blocks = self.block_manager.blocks_for(num_tokens)
        if len(cached_hashes) >= num_blocks:
            raise ValueError(f"cached_hashes: {len(cached_hashes)} blocks, must be fewer than the {num_blocks} the "
                             f"{num_tokens} tokens fill (the last token's block always arrives)")
        blocks = self.block_manager.take_with_prefix(list(cached_hashes), num_blocks)
        self.reserved[request_id] = blocks
        return list(blocks)

    def add_prefilled(self, handoff: KVHandoff, params: SamplingParams) -> None:
        """Decode, from its reserved blocks, a request whose prompt KV was imported into the cache."""
        request_id, prompt_token_ids, first_token = handoff.request_id, handoff.prompt_token_ids, handoff.first_token
        blocks = self.reserved.get(request_id)
        if blocks is None:
            raise ValueError(f"request_id: {request_id!r} has no reserved KV blocks (call reserve_kv first)")
        if len(blocks) != self.block_manager.blocks_for(len(prompt_token_ids)):
            raise ValueError(f"prompt_token_ids: {len(prompt_token_ids)} tokens do not match the "
                             f"{len(blocks)} blocks reserved for {request_id!r}")
        if not isinstance(first_token, int) or not 0 <= first_token < self.model_config.vocab_size:
            raise ValueError(f"first_token: got {first_token!r}, must be a token id")
        del self.reserved[request_id]
        try:
            seq = self._new_sequence(request_id, prompt_token_ids, params)
        except ValueError:
            self.block_manager.free(blocks)
            raise
        seq.block_table = blocks
        seq.num_cached_tokens = seq.num_tokens
        self.block_manager.cache_full_blocks(seq)   # its KV is written: a next turn may share the blocks now
        seq.append_token(first_token)
        # The prompt worker already returned the first token and its text.
        seq.finish_reason = self.scheduler.finish_reason(seq, first_token)
        detokenize(seq, first_token)
        seq.num_emitted_chars = len(seq.output_text)
        if seq.finish_reason:
            self.block_manager.deallocate(seq)
            seq.status = SequenceStatus.FINISHED
            self.pending.append(StepOutput(request_id, [], "", True, seq.finish_reason))
            return
        self.requests[request_id] = seq
        self.scheduler.add_ready(seq)

    # ---- steps ----

    def step(self) -> list[StepOutput]:
        outputs, self.pending = self.pending, []
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return outputs
        token_ids = self.execute(seqs, is_prefill)
        postprocess(self.scheduler, seqs, token_ids)
        return outputs + [self._output(seq) for seq, token_id in zip(seqs, token_ids)
                          if token_id is not None and seq.finish_reason != "abort"]

    def _output(self, seq: Sequence) -> StepOutput:
        if seq.status is SequenceStatus.FINISHED:
            del self.requests[seq.request_id]
        return StepOutput(seq.request_id, [seq.last_token], take_text(seq), seq.is_finished, seq.finish_reason,
                          seq.num_prefix_cached_tokens or 0)

    def execute(self, seqs: list[Sequence], is_prefill: bool) -> list[int | None]:
        """One step: each sequence's scheduled tokens (a decode's one, a prompt's chunk) over its cached
        context, in one flat batch. Returns the next token of each sequence the step brings to its end,
        None for a prompt chunk that is not its last."""
        logits = self.runner.run(self.forward_batch(seqs))
        done = [i for i, seq in enumerate(seqs) if seq.num_scheduled_tokens == seq.num_uncached_tokens]
        token_ids: list[int | None] = [None] * len(seqs)
        if done:
            sampled = self._sample(logits[done], [seqs[i] for i in done])
            for i, token_id in zip(done, sampled):
                token_ids[i] = token_id
        return token_ids

    def forward_batch(self, seqs: list[Sequence]) -> ForwardBatch:
        bs = self.config.block_size
        input_ids, positions, slots, cu_seqlens, context_lens = [], [], [], [0], []
        for seq in seqs:
            start, end = seq.num_cached_tokens, seq.num_cached_tokens + seq.num_scheduled_tokens
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(seq.slot(p, bs) for p in range(start, end))
            cu_seqlens.append(cu_seqlens[-1] + end - start)
            context_lens.append(end)
        return ForwardBatch([seq.request_id for seq in seqs], _longs(input_ids), _longs(positions), _longs(slots),
                            cu_seqlens, context_lens, [list(seq.block_table) for seq in seqs],
                            [seq.request_id for seq in seqs if seq.num_cached_tokens < seq.num_prompt_tokens])

    def _sample(self, logits: Tensor, seqs: list[Sequence]) -> list[int]:
        return sample(logits, [seq.params for seq in seqs], [seq.num_tokens for seq in seqs])


def _longs(values: list) -> Tensor:
    return torch.tensor(values, dtype=torch.long)
