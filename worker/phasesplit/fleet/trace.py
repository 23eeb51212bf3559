"""Request traces: the Azure LLM inference format, Poisson re-draws of one, synthetic ones."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from phasesplit.fleet.perf import bundled

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
BUNDLED = {"code": "code.csv", "conv": "conv.csv"}


@dataclass(frozen=True)
class Trace:
    """Arrival seconds (from 0, sorted), prompt tokens and output tokens, one entry a request."""
    arrival: np.ndarray
    prompt: np.ndarray
    output: np.ndarray

    def __len__(self) -> int:
        return len(self.arrival)

    @property
    def rate(self) -> float:
        span = float(self.arrival[-1] - self.arrival[0]) if len(self) > 1 else 0.0
        return (len(self) - 1) / span if span > 0 else float("inf")


def load_trace(source: str | Path) -> Trace:
    """A CSV with TIMESTAMP, ContextTokens, GeneratedTokens, or a bundled one by name (code, conv)."""
    path = bundled(BUNDLED[str(source)]) if str(source) in BUNDLED else Path(source)
    if not path.exists():
        raise ValueError(f"trace {source}: no such file (bundled traces: {', '.join(BUNDLED)})")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"trace {path}: missing column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}")
        rows = list(reader)
    if not rows:
        raise ValueError(f"trace {path}: no requests")
    times = np.array([_seconds(r["TIMESTAMP"], path, i) for i, r in enumerate(rows, start=2)])
    prompt = np.array([_tokens(r, "ContextTokens", path, i) for i, r in enumerate(rows, start=2)])
    output = np.array([_tokens(r, "GeneratedTokens", path, i) for i, r in enumerate(rows, start=2)])
    order = np.argsort(times, kind="stable")
    return Trace(times[order] - times[order][0], np.maximum(prompt[order], 1), np.maximum(output[order], 1))


def _seconds(text: str, path: Path, line: int) -> float:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    head, _, frac = text.partition(".")
    try:
        return datetime.fromisoformat(head).timestamp() + (float("0." + frac) if frac else 0.0)
    except ValueError:
        raise ValueError(f"trace {path} line {line}: TIMESTAMP {text!r} is neither seconds nor a date-time") from None


def _tokens(row: dict, column: str, path: Path, line: int) -> int:
    try:
        value = int(row[column])
    except (TypeError, ValueError):
        raise ValueError(f"trace {path} line {line}: {column} {row[column]!r} is not an integer") from None
    if value < 0:
        raise ValueError(f"trace {path} line {line}: {column} must be >= 0, got {value}")
    return value


def redraw(trace: Trace, rate: float, num_requests: int | None = None, seed: int = 0) -> Trace:
    """Poisson arrivals at `rate` per second; sizes drawn from the trace's requests."""
    if not rate > 0:
        raise ValueError(f"rate: must be > 0 requests/s, got {rate}")
    n = num_requests or len(trace)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(trace), n)
    arrival = np.cumsum(rng.exponential(1.0 / rate, n))
    return Trace(arrival - arrival[0], trace.prompt[picks], trace.output[picks])


def synthetic(spec: str, rate: float, num_requests: int, seed: int = 0) -> Trace:
    """`PROMPT:OUTPUT`, each a number of tokens or a uniform range `LOW-HIGH`; Poisson arrivals."""
    try:
        prompt_text, output_text = spec.split(":")
        bounds = [tuple(int(v) for v in part.split("-")) for part in (prompt_text, output_text)]
        bounds = [(b[0], b[-1]) for b in bounds]
        if any(lo < 1 or hi < lo for lo, hi in bounds):
            raise ValueError
    except ValueError:
        raise ValueError(f"synthetic: {spec!r} is not PROMPT:OUTPUT with each a count or LOW-HIGH range "
                         "of tokens >= 1 (e.g. 1024:16-256)") from None
    rng = np.random.default_rng(seed)
    sizes = [rng.integers(lo, hi + 1, num_requests) for lo, hi in bounds]
    base = Trace(np.zeros(num_requests), sizes[0], sizes[1])
    return redraw(base, rate, num_requests, seed + 1) if rate else base
