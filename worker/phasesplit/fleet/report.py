"""What a simulation shows: latency percentiles, slowdowns, throughput, cost and power; SLO checks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from phasesplit.fleet.perf import PerfModel
from phasesplit.fleet.sim import Outcome

METRICS = ("ttft", "tbt", "e2e")
QUANTILES = {"p50": 50, "p90": 90, "p99": 99}


def latencies(outcome: Outcome) -> dict[str, np.ndarray]:
    """Seconds per finished request: TTFT, mean time between its tokens (requests of 2+ tokens), E2E."""
    arrival, first, finish = (np.asarray(a, dtype=float) for a in (outcome.arrival, outcome.first, outcome.finish))
    output = np.asarray(outcome.output_tokens)
    done = ~np.isnan(finish)
    multi = done & (output > 1)
    return {"ttft": (first - arrival)[done], "tbt": ((finish - first)[multi] / (output[multi] - 1)),
            "e2e": (finish - arrival)[done]}


def uncontended(outcome: Outcome, reference: PerfModel) -> dict[str, np.ndarray]:
    """The same requests, each alone on a `reference` instance: the denominators of slowdowns."""
    prompt, output = np.asarray(outcome.prompt_tokens), np.asarray(outcome.output_tokens)
    done = ~np.isnan(np.asarray(outcome.finish, dtype=float))
    ttft = np.array([reference.prompt_time(int(n)) for n in prompt[done]])
    tbt1 = reference.token_time(1)
    multi = output[done] > 1
    return {"ttft": ttft, "tbt": np.full(int(multi.sum()), tbt1), "e2e": ttft + (output[done] - 1) * tbt1}


def _percentiles(values: np.ndarray) -> dict[str, float | None]:
    if not len(values):
        return {q: None for q in QUANTILES}
    return {q: round(float(np.percentile(values, p)), 4) for q, p in QUANTILES.items()}


def summarize(outcome: Outcome, reference: PerfModel | None = None) -> dict:
    lat = latencies(outcome)
    completed = int(len(lat["e2e"]))
    first_arrival, last_arrival = (min(outcome.arrival), max(outcome.arrival)) if outcome.arrival else (0.0, 0.0)
    span = outcome.duration - first_arrival
    arriving = last_arrival - first_arrival
    summary = {
        "requests": len(outcome.arrival),
        "completed": completed,
        "unfinished": len(outcome.arrival) - completed - outcome.rejected,
        "rejected": outcome.rejected,
        "duration_s": round(outcome.duration, 3),
        "offered_rps": round((len(outcome.arrival) - 1) / arriving, 4) if arriving > 0 else 0.0,
        "throughput_rps": round(completed / span, 4) if span > 0 else 0.0,
        "drain_s": round(max(outcome.duration - last_arrival, 0.0), 3),
        **{f"{m}_s": _percentiles(lat[m]) for m in METRICS},
        "pools": outcome.pools,
        "cost_per_hour": round(sum(p["cost_per_hour"] for p in outcome.pools.values()), 2),
        "power_w": round(sum(p["power_w"] for p in outcome.pools.values()), 1),
        "prefix_caching": outcome.prefix_caching,
        "prefix_hit_ratio": round(outcome.cached_tokens / outcome.prefilled_tokens, 4) if outcome.prefilled_tokens
        else 0.0,
        "kv_bytes_moved": int(outcome.kv_bytes_moved),
    }
    if reference is not None:
        base = uncontended(outcome, reference)
        summary["slowdown"] = {m: _percentiles(lat[m] / base[m]) for m in METRICS}
        summary["slowdown_reference"] = reference.hardware.name
    if outcome.scaling:
        summary["scaling"] = outcome.scaling
    summary["extrapolated"] = outcome.extrapolated
    summary["warnings"] = warnings(outcome.extrapolated)
    return summary


EXTRAPOLATED = {"decode_batch": ("decode batches of up to {run} sequences", "batch ({measured})"),
                "prefill_tokens": ("prefill batches of up to {run} tokens", "prefill ({measured} tokens)")}


def warnings(extrapolated: dict[str, dict[str, int]]) -> list[str]:
    """A sentence for each kind of iteration the run priced beyond the profile's measured points."""
    out = []
    for kind, seen in extrapolated.items():
        what, limit = EXTRAPOLATED[kind]
        out.append(f"{what.format(run=seen['largest_run'])} ran beyond the profile's largest measured "
                   f"{limit.format(measured=seen['largest_measured'])}: their times are extrapolated along "
                   "the last two points' slope")
    return out


@dataclass(frozen=True)
class Slo:
    """One objective: `metric` (ttft, tbt, e2e) at `quantile` (p50, p90, p99) at most `limit`,
    in seconds or (`slowdown`) as a multiple of the uncontended run."""
    metric: str
    quantile: str
    limit: float
    slowdown: bool

    @classmethod
    def parse(cls, text: str) -> Slo:
        """`ttft.p90=3x` (slowdown) or `e2e.p99=20s` (seconds)."""
        try:
            key, value = text.split("=")
            metric, quantile = key.strip().lower().split(".")
            value = value.strip().lower()
            slowdown = value.endswith("x")
            limit = float(value.rstrip("xs"))
            if metric not in METRICS or quantile not in QUANTILES or not limit > 0 or value[-1] not in "xs":
                raise ValueError
        except ValueError:
            raise ValueError(f"--slo: {text!r} is not METRIC.QUANTILE=LIMIT with METRIC one of ttft, tbt, e2e, "
                             "QUANTILE one of p50, p90, p99, LIMIT seconds (2.5s) or a slowdown (3x)") from None
        return cls(metric, quantile, limit, slowdown)

    def value(self, summary: dict) -> float | None:
        table = summary["slowdown"] if self.slowdown else {m: summary[f"{m}_s"] for m in METRICS}
        return table[self.metric][self.quantile]

    def met(self, summary: dict) -> bool:
        value = self.value(summary)
        return value is not None and value <= self.limit

    def __str__(self) -> str:
        return f"{self.metric}.{self.quantile}={self.limit:g}{'x' if self.slowdown else 's'}"


# The Splitwise paper's SLOs: slowdowns against the request running alone.
PAPER_SLOS = tuple(Slo.parse(s) for s in ("ttft.p50=2x", "ttft.p90=3x", "ttft.p99=6x", "tbt.p50=1.25x",
                                           "tbt.p90=1.5x", "tbt.p99=5x", "e2e.p50=1.25x", "e2e.p90=1.5x",
                                           "e2e.p99=5x"))


def slos_met(summary: dict, slos: tuple[Slo, ...]) -> bool:
    """Every objective holds and no request was left behind."""
    return summary["unfinished"] == 0 and summary["rejected"] == 0 and all(s.met(summary) for s in slos)


def table(summary: dict) -> str:
    lines = [f"requests {summary['requests']}  completed {summary['completed']}  unfinished {summary['unfinished']}"
             f"  rejected {summary['rejected']}",
             f"offered {summary['offered_rps']:.3f} req/s; completed {summary['throughput_rps']:.3f} req/s over "
             f"{summary['duration_s']:.1f} s, of which {summary['drain_s']:.1f} s drained after the last arrival",
             f"{'':8}{'P50':>10}{'P90':>10}{'P99':>10}"]
    for m in METRICS:
        row = summary[f"{m}_s"]
        lines.append(f"{m.upper() + ' s':8}" + "".join(_cell(row[q]) for q in QUANTILES))
    if "slowdown" in summary:
        for m in METRICS:
            row = summary["slowdown"][m]
            lines.append(f"{m.upper() + ' x':8}" + "".join(_cell(row[q]) for q in QUANTILES))
        lines.append(f"(x: slowdown against the request alone on {summary['slowdown_reference']})")
    lines.append(f"{'pool':8}{'hardware':>16}{'machines':>10}{'util':>8}{'$/h':>10}{'power W':>10}{'KV tokens':>12}")
    for role, p in summary["pools"].items():
        lines.append(f"{role:8}{p['hardware']:>16}{p['machines']:>10g}{p['utilization']:>8.1%}"
                     f"{p['cost_per_hour']:>10.2f}{p['power_w']:>10.0f}{p['kv_capacity_tokens']:>12,}")
    lines.append(f"{'total':8}{'':>16}{'':>10}{'':>8}{summary['cost_per_hour']:>10.2f}{summary['power_w']:>10.0f}")
    if summary["prefix_caching"]:
        lines.append(f"prefix cache: {summary['prefix_hit_ratio']:.1%} of prompt tokens served from a cache")
    if summary["kv_bytes_moved"]:
        lines.append(f"KV handed off: {summary['kv_bytes_moved'] / 1e9:,.1f} GB")
    lines += [f"WARNING: {w}" for w in summary.get("warnings", ())]
    return "\n".join(lines)


def _cell(v: float | None) -> str:
    return f"{'-':>10}" if v is None else f"{v:>10.4g}"
