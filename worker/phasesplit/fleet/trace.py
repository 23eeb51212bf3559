"""Request traces: the Azure LLM inference format, the Mooncake format (with the hashes of each
prompt's 512-token blocks, for prefix caching), Poisson re-draws of one, synthetic ones."""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from phasesplit.fleet.perf import bundled

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")
HASH_BLOCK_TOKENS = 512   # tokens per hashed prompt block in the Mooncake traces
BUNDLED = {"code": "code.csv", "conv": "conv.csv", "mooncake-conv": "mooncake_conversation.jsonl.gz",
           "mooncake-synthetic": "mooncake_synthetic.jsonl.gz"}


@dataclass(frozen=True)
class Trace:
    """Arrival seconds (from 0, sorted), prompt tokens and output tokens, one entry a request;
    `blocks` (Mooncake traces): each prompt's chained block hashes, or None when the trace has none."""
    arrival: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    blocks: tuple[tuple[int, ...], ...] | None = None

    def __len__(self) -> int:
        return len(self.arrival)

    def head(self, n: int) -> Trace:
        """The first `n` requests."""
        blocks = self.blocks[:n] if self.blocks is not None else None
        return Trace(self.arrival[:n], self.prompt[:n], self.output[:n], blocks)

    @property
    def rate(self) -> float:
        span = float(self.arrival[-1] - self.arrival[0]) if len(self) > 1 else 0.0
        return (len(self) - 1) / span if span > 0 else float("inf")


def load_trace(source: str | Path) -> Trace:
    """A CSV with TIMESTAMP, ContextTokens, GeneratedTokens, a Mooncake JSON-lines file (.jsonl,
    .jsonl.gz), or a bundled one by name (code, conv, mooncake-conv, mooncake-synthetic)."""
    path = bundled(BUNDLED[str(source)]) if str(source) in BUNDLED else Path(source)
    if not path.exists():
        raise ValueError(f"trace {source}: no such file (bundled traces: {', '.join(BUNDLED)})")
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return load_mooncake(path)
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


def load_mooncake(path: Path) -> Trace:
    """One JSON object a line: `timestamp` (ms), `input_length`, `output_length`, `hash_ids`."""
    opener = gzip.open if path.name.endswith(".gz") else open
    rows = []
    with opener(path, "rt") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                rows.append(_mooncake_row(line, path, line_no))
    if not rows:
        raise ValueError(f"trace {path}: no requests")
    rows.sort(key=lambda r: r[0])
    times = np.array([r[0] for r in rows]) / 1000.0
    return Trace(times - times[0], np.array([max(r[1], 1) for r in rows]), np.array([max(r[2], 1) for r in rows]),
                 tuple(r[3] for r in rows))


def _mooncake_row(line: str, path: Path, line_no: int) -> tuple[float, int, int, tuple[int, ...]]:
    try:
        row = json.loads(line)
        missing = [k for k in MOONCAKE_FIELDS if k not in row]
    except (json.JSONDecodeError, TypeError):
        raise ValueError(f"trace {path} line {line_no}: not a JSON object") from None
    if missing:
        raise ValueError(f"trace {path} line {line_no}: missing field(s) {', '.join(missing)}; "
                         f"expected {', '.join(MOONCAKE_FIELDS)}")
    try:
        values = float(row["timestamp"]), int(row["input_length"]), int(row["output_length"])
        hashes = tuple(int(h) for h in row["hash_ids"])
    except (TypeError, ValueError):
        raise ValueError(f"trace {path} line {line_no}: timestamp, input_length, output_length must be numbers "
                         "and hash_ids a list of integers") from None
    if values[1] < 0 or values[2] < 0:
        raise ValueError(f"trace {path} line {line_no}: input_length and output_length must be >= 0")
    if len(hashes) != -(-values[1] // HASH_BLOCK_TOKENS):
        raise ValueError(f"trace {path} line {line_no}: {len(hashes)} hash_ids for {values[1]} input tokens; "
                         f"expected one per {HASH_BLOCK_TOKENS}-token block")
    return (*values, hashes)


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
    """Poisson arrivals at `rate` per second; sizes drawn from the trace's requests. A trace with
    block hashes keeps its own requests in their order (the first `num_requests`), so that the
    turns of a conversation still follow each other and share their prefixes."""
    if not rate > 0:
        raise ValueError(f"rate: must be > 0 requests/s, got {rate}")
    n = num_requests or len(trace)
    rng = np.random.default_rng(seed)
    if trace.blocks is not None:
        picks = np.arange(min(n, len(trace)))
        n = len(picks)
    else:
        picks = rng.integers(0, len(trace), n)
    arrival = np.cumsum(rng.exponential(1.0 / rate, n))
    blocks = tuple(trace.blocks[i] for i in picks) if trace.blocks is not None else None
    return Trace(arrival - arrival[0], trace.prompt[picks], trace.output[picks], blocks)


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
