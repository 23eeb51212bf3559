"""Sampling: greedy, temperature, top-k, top-p, with a per-request seed.

A seeded request's randomness for the token at sequence position n comes from (seed, n) alone, not
from a generator that carries state from draw to draw: a request resumed at position n elsewhere
(a token worker after a KV handoff, or a migration that re-ran the prompt phase over the tokens
already produced) draws exactly what an uninterrupted run would."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from phasesplit.prefix_hash import MAX_CACHE_SALT_LENGTH, valid_cache_salt


@dataclasses.dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # Not a sampling choice but the request's prefix-cache scope, carried with its parameters to every
    # worker: only requests with the same salt share cached blocks.
    cache_salt: str | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        _check(_is_number(self.temperature) and self.temperature >= 0,
               "temperature", self.temperature, "a number >= 0 (0 means greedy)")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 means off)")
        _check(_is_int(self.max_tokens) and self.max_tokens > 0, "max_tokens", self.max_tokens, "an integer > 0")
        _check(self.seed is None or _is_int(self.seed), "seed", self.seed, "an integer or None")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "non-empty strings")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "true or false")
        _check(self.cache_salt is None or valid_cache_salt(self.cache_salt), "cache_salt", self.cache_salt,
               f"a non-empty string of at most {MAX_CACHE_SALT_LENGTH} characters, or unset")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _check(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{field}: got {value!r}, must be {allowed}")


_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """A 64-bit seed for one draw, from the request's seed and the token's position (splitmix64)."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sample(logits: Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
    """logits [B, V] float32 -> one token id per row; positions[i]: the sequence position row i's token takes
    (its sequence's length before it), which with the seed fixes a seeded row's draw."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        idx = torch.tensor(rows, device=logits.device)
        probs = _probs(logits[idx], [params[i] for i in rows])
        tokens[idx] = _draw(probs, [None if params[i].seed is None else position_seed(params[i].seed, positions[i])
                                    for i in rows])
    return tokens.tolist()


def _probs(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    """[N, V] -> probabilities after temperature, top-k and top-p."""
    device, vocab = logits.device, logits.shape[-1]
    temps = torch.tensor([p.temperature for p in params], device=device, dtype=logits.dtype)
    logits = logits / temps[:, None]
    if all(p.top_k == 0 and p.top_p == 1 for p in params):
        return logits.softmax(dim=-1)
    top_k = torch.tensor([p.top_k or vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device, dtype=logits.dtype)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)
    drop = ranks[None, :] >= top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)
    sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    return logits.softmax(dim=-1)


def _draw(probs: Tensor, seeds: list[int | None]) -> Tensor:
    """Exponential-race sampling: argmax(p / E), E ~ Exp(1), drawn from its own seed for a seeded row."""
    noise = torch.empty_like(probs).exponential_()
    for i, seed in enumerate(seeds):
        if seed is not None:
            noise[i].exponential_(generator=torch.Generator(device=probs.device).manual_seed(seed))
    return (probs / noise).argmax(dim=-1)
