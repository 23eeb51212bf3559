"""The performance model: how long one engine iteration takes, from a measured profile table.

A profile is a CSV in the schema of the Splitwise authors' table (`data/perf_model.csv`): one row
a measured run of `model` on `hardware` at `tensor_parallel`, with `prompt_size`, `batch_size`,
`prompt_time` (ms for the batch's prompt phase) and `token_time` (ms for one token iteration of
the batch). Three optional columns, written by `phasesplit profile`, describe the KV cache:
`kv_bytes_per_token`, `kv_capacity_tokens` (per engine instance) and `num_layers`; without them
they come from the model's shape (`data/models.json`) and the machine's GPU memory.

Prompt time is a function of the batch's prompt tokens (`prompt_size * batch_size`), token time
of the number of sequences decoding together; repeats and equal x are averaged. Between
measured points the time is interpolated linearly. Outside them (the stated extrapolation rule):
below the smallest point an iteration costs what the smallest measured one costs (the fixed
cost of launching a step); above the largest it grows along the slope of the last two measured
points (prefill is compute-bound and grows linearly with tokens; a decode batch grows linearly
with its sequences once the weights' read is amortised).

Mixed steps (chunked prefill: prompt chunks beside decodes) are priced from the table that
`phasesplit profile --mixed-out` writes (`chunk_tokens`, `num_decodes`, `step_time` ms), read
with `mixed=` (`--mixed-profiles`): linear over chunk tokens for each measured decode count, then
linear between decode counts, with the same rule outside. Without one, a documented model derived
from the two curves above: the decodes ride the chunk's compute-bound pass as that many more
prompt tokens (Sarathi-Serve's piggybacking), `prompt_time(chunk + decodes)`, and a step is never
cheaper than the decodes alone, `token_time(decodes)`. Either way a chunk that follows `done`
tokens of its prompt also pays for attending to them: what extending a whole prefill from `done`
to `done + chunk` tokens costs beyond a prefill of `chunk` tokens (zero or more).
"""

from __future__ import annotations

import bisect
import csv
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

REQUIRED_COLUMNS = ("model", "hardware", "tensor_parallel", "prompt_size", "batch_size", "prompt_time", "token_time")
PROFILE_COLUMNS = ("model", "hardware", "prompt_size", "batch_size", "token_size", "peak_power", "average_power",
                   "prompt_time", "token_time", "e2e_time", "tensor_parallel", "kv_bytes_per_token",
                   "kv_capacity_tokens", "num_layers")
MIXED_COLUMNS = ("model", "hardware", "chunk_tokens", "num_decodes", "step_time", "tensor_parallel")
KV_MEMORY_FRACTION = 0.9  # of the GPUs' memory left for weights and KV (the rest: activations, runtime)


def bundled(name: str) -> Path:
    return Path(str(resources.files("phasesplit.fleet").joinpath("data", name)))


@dataclass(frozen=True, slots=True)
class Curve:
    """y(x) from measured points: linear inside, the first y below, the last slope above."""
    xs: tuple[float, ...]
    ys: tuple[float, ...]

    @classmethod
    def from_points(cls, points: dict[float, list[float]]) -> Curve:
        xs = sorted(points)
        return cls(tuple(xs), tuple(sum(points[x]) / len(points[x]) for x in xs))

    def __call__(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if x <= xs[0]:
            return ys[0]
        i = bisect.bisect_left(xs, x)
        if i == len(xs):
            if len(xs) == 1:
                return ys[0] * x / xs[0]
            i -= 1
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass(frozen=True, slots=True)
class Hardware:
    """One machine kind of a catalog: what it costs, draws and holds."""
    name: str
    gpus: int
    gpu_memory_gib: float
    cost_per_hour: float
    power_w: float
    link_gbps_per_gpu: float
    description: str = ""
    node_selector: dict[str, str] = field(default_factory=dict)


def load_catalog(path: str | Path | None = None) -> dict[str, Hardware]:
    """Machine kinds from a JSON or YAML mapping name -> fields (the bundled one by default)."""
    text = Path(path or bundled("catalog.json")).read_text()
    if str(path or "").endswith((".yaml", ".yml")):
        import yaml
        raw = yaml.safe_load(text)
    else:
        raw = json.loads(text)
    if not isinstance(raw, dict):
        raise ValueError(f"catalog {path}: expected a mapping of hardware name to its fields")
    catalog = {}
    for name, entry in raw.items():
        try:
            catalog[name] = Hardware(name=name, **entry)
        except TypeError as e:
            raise ValueError(f"catalog entry {name!r}: {e}; fields are gpus, gpu_memory_gib, cost_per_hour, "
                             "power_w, link_gbps_per_gpu, description, node_selector") from None
    return catalog


def load_model_shapes(path: str | Path | None = None) -> dict[str, dict]:
    return json.loads(Path(path or bundled("models.json")).read_text())


@dataclass(frozen=True, slots=True)
class PerfModel:
    """One engine instance: `model` on `tensor_parallel` GPUs of a `hardware` machine."""
    model: str
    hardware: Hardware
    tensor_parallel: int
    prompt_ms: Curve          # batch prompt tokens -> ms
    token_ms: Curve           # sequences in the decode batch -> ms
    kv_bytes_per_token: float
    kv_capacity_tokens: int   # per instance
    mixed_ms: MixedSurface | None = None   # (chunk tokens, decodes) -> ms, from a mixed profile

    @property
    def instances_per_machine(self) -> int:
        return self.hardware.gpus // self.tensor_parallel

    def prompt_time(self, num_tokens: int) -> float:
        """Seconds for a prefill batch of `num_tokens` prompt tokens."""
        return self.prompt_ms(num_tokens) / 1000.0

    def token_time(self, batch_size: int) -> float:
        """Seconds for one decode iteration of `batch_size` sequences."""
        return self.token_ms(batch_size) / 1000.0

    @property
    def largest_measured_batch(self) -> int:
        return int(self.token_ms.xs[-1])

    @property
    def largest_measured_prefill(self) -> int:
        return int(self.prompt_ms.xs[-1])

    def mixed_time(self, chunks: list[tuple[int, int]], num_decodes: int) -> float:
        """Seconds for one chunked-prefill step: `chunks` as (tokens done before, tokens now) of each
        prompt, beside `num_decodes` decoding sequences (the module's docstring says how)."""
        tokens = sum(n for _, n in chunks)
        if self.mixed_ms is not None:
            ms = self.mixed_ms(tokens, num_decodes)
        else:
            ms = max(self.prompt_ms(tokens + num_decodes), self.token_ms(num_decodes) if num_decodes else 0.0)
        for done, n in chunks:
            if done:
                ms += max(0.0, self.prompt_ms(done + n) - self.prompt_ms(done) - self.prompt_ms(n))
        return ms / 1000.0

    @property
    def link_bytes_per_s(self) -> float:
        """Each GPU of the tensor-parallel group sends its own shard of the KV over its own link."""
        return self.hardware.link_gbps_per_gpu * 1e9 / 8 * self.tensor_parallel


@dataclass(frozen=True, slots=True)
class MixedSurface:
    """ms of a mixed step: a `Curve` over chunk tokens for each measured decode count, linear between."""
    decodes: tuple[float, ...]
    curves: tuple[Curve, ...]

    @classmethod
    def from_rows(cls, rows: list[dict[str, str]]) -> MixedSurface:
        points: dict[float, dict[float, list[float]]] = {}
        for r in rows:
            points.setdefault(float(r["num_decodes"]), {}).setdefault(float(r["chunk_tokens"]), []).append(
                float(r["step_time"]))
        decodes = sorted(points)
        return cls(tuple(decodes), tuple(Curve.from_points(points[d]) for d in decodes))

    def __call__(self, chunk_tokens: float, num_decodes: float) -> float:
        return Curve(self.decodes, tuple(c(chunk_tokens) for c in self.curves))(num_decodes)


def kv_transfer_time(num_tokens: int, prefill_s: float, kv_bytes_per_token: float, bytes_per_s: float,
                     num_layers: int, layerwise: bool = True) -> float:
    """Seconds the KV handoff adds after the prefill ends. Layer-wise, layer i's bytes leave while
    layer i+1 computes: what is left is the last layer's transfer, or the backlog when the link is
    slower than the compute. Serialized, the whole transfer follows the prefill."""
    total = num_tokens * kv_bytes_per_token / bytes_per_s
    if not layerwise:
        return total
    per_layer_compute = prefill_s / num_layers
    return max(total / num_layers, total - prefill_s + per_layer_compute)


def read_profile_rows(path: str | Path | None = None) -> list[dict[str, str]]:
    path = Path(path or bundled("perf_model.csv"))
    return _read_table(path, "profile", REQUIRED_COLUMNS, PROFILE_COLUMNS)


def read_mixed_rows(path: str | Path) -> list[dict[str, str]]:
    """A mixed-step table as `phasesplit profile --mixed-out` writes it."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"--mixed-profiles: {path}: no such file")
    return _read_table(path, "mixed profile", MIXED_COLUMNS, MIXED_COLUMNS, " (phasesplit profile --mixed-out)")


def _read_table(path: Path, what: str, required, schema, hint: str = "") -> list[dict[str, str]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{what} {path}: missing column(s) {', '.join(missing)}; "
                             f"the schema is {', '.join(schema)}{hint}")
        return list(reader)


class Profiles:
    """A profile table, the machine catalog and model shapes: builds `PerfModel`s on demand."""

    def __init__(self, profile: str | Path | None = None, catalog: str | Path | None = None,
                 shapes: str | Path | None = None, mixed: str | Path | None = None):
        self.rows = read_profile_rows(profile)
        self.mixed_rows = read_mixed_rows(mixed) if mixed else []
        self.catalog = load_catalog(catalog)
        self.shapes = load_model_shapes(shapes)
        self._cache: dict[tuple, PerfModel] = {}

    def keys(self) -> list[tuple[str, str, int]]:
        return sorted({(r["model"], r["hardware"], int(r["tensor_parallel"])) for r in self.rows})

    def get(self, model: str, hardware: str, tensor_parallel: int) -> PerfModel:
        key = (model, hardware, tensor_parallel)
        if key not in self._cache:
            self._cache[key] = self._build(*key)
        return self._cache[key]

    def _build(self, model: str, hardware: str, tp: int) -> PerfModel:
        rows = [r for r in self.rows
                if r["model"] == model and r["hardware"] == hardware and int(r["tensor_parallel"]) == tp]
        if not rows:
            known = ", ".join(f"{m}/{h}/tp{t}" for m, h, t in self.keys())
            raise ValueError(f"no profile rows for model={model} hardware={hardware} tp={tp}; the table has {known}")
        if hardware not in self.catalog:
            raise ValueError(f"hardware {hardware!r} is not in the catalog ({', '.join(self.catalog)}); "
                             "add it to a catalog file (--catalog)")
        hw = self.catalog[hardware]
        if tp > hw.gpus or hw.gpus % tp:
            raise ValueError(f"tp: {tp} does not divide the {hw.gpus} GPUs of a {hardware} machine")
        prompt: dict[float, list[float]] = {}
        token: dict[float, list[float]] = {}
        for r in rows:
            batch = int(r["batch_size"])
            prompt.setdefault(int(r["prompt_size"]) * batch, []).append(float(r["prompt_time"]))
            token.setdefault(batch, []).append(float(r["token_time"]))
        kv_bytes, capacity = self._kv(model, hw, tp, rows[0])
        mixed = [r for r in self.mixed_rows
                 if r["model"] == model and r["hardware"] == hardware and int(r["tensor_parallel"]) == tp]
        return PerfModel(model, hw, tp, Curve.from_points(prompt), Curve.from_points(token), kv_bytes, capacity,
                         MixedSurface.from_rows(mixed) if mixed else None)

    def _kv(self, model: str, hw: Hardware, tp: int, row: dict[str, str]) -> tuple[float, int]:
        if row.get("kv_bytes_per_token") and row.get("kv_capacity_tokens", "num_layers"):
            return float(row["kv_bytes_per_token"]), int(float(row["kv_capacity_tokens"]))
        if model not in self.shapes:
            raise ValueError(f"model {model!r}: the profile has no kv_bytes_per_token/kv_capacity_tokens columns "
                             f"and no shape is known for it ({', '.join(self.shapes)})")
        s = self.shapes[model]
        per_token = 2 * s["num_layers"] * s["num_kv_heads"] * s["head_dim"] * s["dtype_bytes"]
        free = tp * hw.gpu_memory_gib * 2**30 * KV_MEMORY_FRACTION - s["weight_bytes"]
        if free <= 0:
            raise ValueError(f"model {model} does not fit on {tp} GPUs of {hw.name}")
        return float(per_token), int(free // per_token)

    def num_layers(self, model: str) -> int:
        """Layers of the model, for the layer-wise KV transfer (a profile column, or the model's shape)."""
        for r in self.rows:
            if r["model"] == model and r.get("num_layers"):
                return int(r["num_layers"])
        if model not in self.shapes:
            raise ValueError(f"model {model!r}: the profile has no num_layers column and no shape is known for it")
        return int(self.shapes[model]["num_layers"])

