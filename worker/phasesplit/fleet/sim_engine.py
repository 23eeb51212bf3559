"""`phasesplit worker --engine sim`: the engine's own scheduler and KV block accounting, with each
iteration's time taken from the performance model and deterministic tokens instead of a model.

`SimEngine` is an `LLMEngine` (requests, batching, chunked prefill, prefix caching, blocks,
preemption, the split handoff's reserve/commit are the engine's code) that loads no weights and
allocates no KV tensors: a prefill batch takes `prompt_time(its tokens to compute)`, a step with
prompt chunks or cached context `mixed_time(its chunks, its decodes)` and a decode iteration
`token_time(its sequences)` of the simulated model on the simulated hardware, all times `time_scale`
(slow motion, so that the real cost of gRPC and HTTP per token stays small next to the modelled
times). Its KV pool holds the
blocks the simulated instance would (`kv_capacity_tokens`). The model directory gives only the
tokenizer and config.json (what the router reads too); the tokens cycle through a fixed sentence
and never hit end-of-sequence, so a request runs to its `max_tokens`."""

from __future__ import annotations

import os
import time

import torch

from phasesplit.control.worker_config import WorkerConfig
from phasesplit.engine.config import EngineConfig, ModelConfig
from phasesplit.engine.engine import LLMEngine
from phasesplit.engine.kv_cache import BlockManager, KVLayout
from phasesplit.engine.loader import resolve_dtype
from phasesplit.engine.parallel import TensorParallel
from phasesplit.engine.scheduler import Scheduler
from phasesplit.engine.sequence import Sequence
from phasesplit.engine.tokenizer import Tokenizer
from phasesplit.fleet.perf import PerfModel, Profiles
from phasesplit.transport.layout import dtype_name

SENTENCE = " the fleet serves this token from a simulated engine."


class SimEngine(LLMEngine):
    layer_hook = None  # a plain attribute: there is no model runner to hand it to

    def __init__(self, config: EngineConfig, perf: PerfModel, num_layers: int, shape: dict | None = None,
                 time_scale: float = 1.0, layerwise: bool = True):
        if not time_scale > 0:
            raise ValueError(f"--sim-time-scale: must be > 0, got {time_scale}")
        self.config, self.perf, self.time_scale, self.layerwise = config, perf, time_scale, layerwise
        self.device = torch.device("cpu")
        self.tp = TensorParallel()  # one process, whatever tensor-parallel size it simulates
        self.dtype = resolve_dtype(config.dtype)
        self.model_config = ModelConfig.from_dir(config.model_dir)
        self.tokenizer = Tokenizer.from_dir(config.model_dir)
        self.model = None
        shape = shape or {}
        self.layout = KVLayout(
            model=config.served_model_name or os.path.basename(os.path.normpath(config.model_dir)),
            dtype=dtype_name(self.dtype), num_layers=num_layers,
            num_kv_heads=int(shape.get("num_kv_heads", self.model_config.num_kv_heads)),
            head_dim=int(shape.get("head_dim", self.model_config.head_dim)), block_size=config.block_size)
        # A simulation has no position-embedding limit: --max-model-len may exceed the tokenizer model's.
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        num_blocks = config.num_kv_blocks or perf.kv_capacity_tokens // config.block_size
        if num_blocks * config.block_size < self.max_model_len:
            raise ValueError(f"num_kv_blocks: {num_blocks} blocks of {config.block_size} tokens cannot hold one "
                             f"sequence of max_model_len={self.max_model_len}")
        self.block_manager = BlockManager(num_blocks, config.block_size, config.prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, set(), config.chunked_prefill)
        self.requests, self.reserved, self.pending = {}, {}, []
        self.layer_hook = None
        self.prefilled: dict[str, tuple[float, float]] = {}  # prefill-only request -> (end, modelled seconds)
        self._prefilling: dict[str, float] = {}   # modelled seconds of the steps a prompt has had chunks in
        eos = set(self.model_config.eos_token_ids) | set(self.tokenizer.eos_token_ids)
        self.cycle = [t for t in self.tokenizer.encode(SENTENCE, add_special_tokens=False) if t not in eos]
        if not self.cycle:
            raise ValueError(f"{config.model_dir}: the tokenizer encodes no ordinary token")

    # ---- the two iterations, timed by the model ----

    def execute(self, seqs: list[Sequence], is_prefill: bool) -> list[int | None]:
        return self.prefill(seqs) if is_prefill else self.decode_one_token(seqs)

    def prefill(self, seqs: list[Sequence]) -> list[int | None]:
        """A step that computes prompt tokens: whole prompts, or chunks beside the running decodes."""
        start = time.perf_counter()
        decodes = [seq for seq in seqs if _decodes(seq)]
        prompts = [seq for seq in seqs if not _decodes(seq)]
        chunks = [(seq.num_cached_tokens, seq.num_scheduled_tokens) for seq in prompts]
        if decodes or any(done for done, _ in chunks):
            modelled = self.perf.mixed_time(chunks, len(decodes))
        else:
            modelled = self.perf.prompt_time(sum(n for _, n in chunks))
        seconds, layers, ids = modelled * self.time_scale, self.layout.num_layers, [seq.request_id for seq in prompts]
        for layer in range(layers):
            # Layer by layer, so that a layer-wise handoff sees each layer finish when the model says it does.
            if self.layer_hook is not None:
                self.layer_hook(layer, ids)
            if self.layerwise or layer == layers - 1:
                _sleep_until(start + seconds * (layer + 1) / layers)
        end = time.perf_counter()
        tokens: list[int | None] = []
        for seq in seqs:
            last = seq.num_scheduled_tokens == seq.num_uncached_tokens
            if seq.prefill_only:
                spent = self._prefilling.pop(seq.request_id, 0.0) + modelled
                if last:
                    self.prefilled[seq.request_id] = (end, spent)
                else:
                    self._prefilling[seq.request_id] = spent
            tokens.append(self._token(seq) if last else None)
        return tokens

    def decode_one_token(self, seqs: list[Sequence]) -> list[int]:
        start = time.perf_counter()
        _sleep_until(start + self.perf.token_time(len(seqs)) * self.time_scale)
        return [self._token(seq) for seq in seqs]

    def prefill_piece(self, request_id: str, since: int | None = None) -> tuple[int, list[int]]:
        """As the engine's, from the request's sequence in the running step: the blocks its chunk writes."""
        seq, size = self.requests[request_id], self.config.block_size
        end = seq.num_cached_tokens + seq.num_scheduled_tokens
        first = seq.num_cached_tokens // size if since is None else since
        return first, seq.block_table[first:-(-end // size)]

    def kv_layer(self, layer: int) -> tuple[None, None]:
        """No KV is stored: the handoff's sender (`sim_handoff`) takes placeholders."""
        return None, None

    def release(self, request_id: str) -> bool:
        self.prefilled.pop(request_id, None)
        self._prefilling.pop(request_id, None)
        return super().release(request_id)

    def abort(self, request_id: str) -> bool:
        self.prefilled.pop(request_id, None)
        self._prefilling.pop(request_id, None)
        return super().abort(request_id)

    def _token(self, seq: Sequence) -> int:
        return self.cycle[seq.num_tokens % len(self.cycle)]

    def close(self) -> None:
        """One rank: no followers to stop."""

    def kv_bytes(self, num_tokens: int) -> int:
        """What the handoff of `num_tokens` tokens would move on the simulated hardware."""
        return int(num_tokens * self.perf.kv_bytes_per_token)


def _decodes(seq: Sequence) -> bool:
    """Whether a sequence in a step computes the token after one it was given (not a prompt token)."""
    return seq.num_output_tokens > 0 and seq.num_uncached_tokens == 1


def _sleep_until(deadline: float) -> None:
    left = deadline - time.perf_counter()
    if left > 0:
        time.sleep(left)


def load(config: WorkerConfig) -> SimEngine:
    """The simulated engine a worker's config describes (through `roles.engines`, for `--engine sim`)."""
    profiles = Profiles(config.sim_profiles, config.sim_catalog)
    perf = profiles.get(config.sim_model, config.sim_hardware, config.sim_tp)
    return SimEngine(config.engine_config(device="cpu"), perf, profiles.num_layers(config.sim_model),
                     profiles.shapes.get(config.sim_model), config.sim_time_scale, config.layerwise)
