"""`Sequence`: one request's token ids, block table and sampling parameters."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from phasesplit.engine.stop_strings import stop_matcher

if TYPE_CHECKING:
    from phasesplit.engine.sampler import SamplingParams
    from phasesplit.engine.tokenizer import IncrementalDetokenizer


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    HELD = enum.auto()  # prefill-only, finished, blocks kept for export
    FINISHED = enum.auto()


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 detokenizer: IncrementalDetokenizer | None = None, prefill_only: bool = False):
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.detokenizer = detokenizer  # the engine's post-processing uses it; the scheduler never does
        self.prefill_only = prefill_only
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        # Tokens whose K/V are in the cache; the rest are computed by the next step.
        self.num_cached_tokens = 0
        self.num_scheduled_tokens = 0  # how many of the rest the current step computes
        # Prefix caching (the block manager's): the hashes of its full blocks so far, how many of its
        # blocks are registered, and the prompt tokens its first admission found cached (None before).
        self.block_hashes: list[int] = []
        self.num_registered_blocks = 0
        self.num_prefix_cached_tokens: int | None = None
        self.cached_prefix_probe = (-1, 0)  # (the block manager's evictions then, leading blocks found cached)
        self.output_text = ""
        self.num_emitted_chars = 0
        # The stop strings' automaton (held here: a shared one may leave the cache) and its state after output_text.
        self.stop_matcher = stop_matcher(params.stop) if params.stop else None
        self.stop_state = 0
        self.finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncached_tokens(self) -> int:
        return len(self.token_ids) - self.num_cached_tokens

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status in (SequenceStatus.FINISHED, SequenceStatus.HELD)

    def slot(self, position: int, block_size: int) -> int:
        return self.block_table[position // block_size] * block_size + position % block_size

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={self.num_tokens}, cached={self.num_cached_tokens}, "
                f"blocks={len(self.block_table)}, {self.status.name})")


def push_text(seq: Sequence, delta: str) -> bool:
    """Add detokenized text; True when a stop string appeared (the text is cut where it starts)."""
    if seq.stop_matcher is None:
        seq.output_text += delta
        return False
    seq.stop_state, start = seq.stop_matcher.feed(seq.stop_state, delta)
    if start is None:
        seq.output_text += delta
        return False
    cut = len(seq.output_text) + start
    seq.output_text = (seq.output_text + delta)[:cut]
    return True


def take_text(seq: Sequence) -> str:
    """The text not yet returned, minus a tail that might still grow into a stop string."""
    end = len(seq.output_text)
    if not seq.is_finished and seq.stop_matcher is not None:
        end -= seq.stop_matcher.pending(seq.stop_state)
    delta = seq.output_text[seq.num_emitted_chars:end]
    seq.num_emitted_chars = max(seq.num_emitted_chars, end)
    return delta
