"""Pictures of a simulation and of a plan, for `simulate --plot` and `plan --plot` (needs matplotlib,
the `plots` extra; without it the commands say so and print their text as ever).

- A simulation: the latency CDFs of TTFT, TBT and E2E with the SLOs on them (as slowdowns when the
  SLOs of that metric are slowdowns, else in seconds), each pool's utilisation and queue over time.
- A plan: cost per hour against the rate each candidate sustains at the SLOs, one point per
  candidate, the cost/throughput frontier drawn through the candidates no other beats on both.
"""

from __future__ import annotations

import textwrap

import numpy as np

from phasesplit.fleet.report import METRICS, QUANTILES, Slo, latencies, uncontended

KIND_COLORS = {"baseline": "tab:gray", "chunked": "tab:green", "split": "tab:blue"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'phasesplit[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_simulation(outcome, summary: dict, slos: tuple[Slo, ...], reference, path: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    seconds = latencies(outcome)
    base = uncontended(outcome, reference)
    for ax, metric in zip(axes[0], METRICS):
        own = [s for s in slos if s.metric == metric]
        as_slowdown = bool(own) and all(s.slowdown for s in own)
        values = seconds[metric] / base[metric] if as_slowdown else seconds[metric]
        _cdf(ax, values, f"{metric.upper()} {'slowdown (x)' if as_slowdown else 's'}")
        for slo in own:
            if slo.slowdown == as_slowdown:
                _slo_mark(ax, slo, slo.met(summary))
    for role, line in outcome.timeline.items():
        axes[1][0].plot(line["time"], line["utilization"], label=role)
        axes[1][1].plot(line["time"], line["queue"], label=role)
    axes[1][0].set(title="utilisation", xlabel="time (s)", ylim=(0, 1.05))
    axes[1][1].set(title="queue (requests waiting)", xlabel="time (s)")
    for ax in axes[1][:2]:
        ax.legend(loc="upper right")
        ax.grid(alpha=0.3)
    _summary_text(axes[1][2], summary)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cdf(ax, values: np.ndarray, label: str) -> None:
    xs = np.sort(values)
    ax.plot(xs, np.arange(1, len(xs) + 1) / max(len(xs), 1))
    ax.set(title=f"{label}: CDF", xlabel=label, ylabel="share of requests", ylim=(0, 1.02))
    if len(xs) and xs[0] > 0 and xs[-1] / xs[0] > 100:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)


def _slo_mark(ax, slo: Slo, met: bool) -> None:
    q = QUANTILES[slo.quantile] / 100
    color = "tab:green" if met else "tab:red"
    ax.axvline(slo.limit, color=color, linestyle="--", alpha=0.6)
    ax.plot([slo.limit], [q], marker="o", color=color)
    ax.annotate(f"{slo.quantile} <= {slo.limit:g}{'x' if slo.slowdown else 's'}", (slo.limit, q),
                textcoords="offset points", xytext=(4, -10), fontsize=8, color=color)


def _summary_text(ax, summary: dict) -> None:
    ax.axis("off")
    lines = [f"offered {summary['offered_rps']:.2f} req/s, completed {summary['throughput_rps']:.2f} req/s",
             f"{summary['completed']} of {summary['requests']} requests, {summary['rejected']} rejected",
             f"cost {summary['cost_per_hour']:.0f}/h, {summary['power_w'] / 1000:.0f} kW"]
    if summary.get("prefix_caching"):
        lines.append(f"prefix cache hits: {summary['prefix_hit_ratio']:.1%} of prompt tokens")
    for role, p in summary["pools"].items():
        lines.append(f"{role}: {p['machines']:g} x {p['hardware']}, {p['utilization']:.0%} busy")
    missed = [name for name, r in summary.get("slos", {}).items() if not r["met"]]
    lines.append("SLOs: all met" if not missed else f"SLOs missed: {', '.join(missed)}")
    lines += [textwrap.fill(f"! {w}", 60, subsequent_indent="  ") for w in summary.get("warnings", ())]
    ax.text(0, 1, "\n".join(lines), va="top", fontsize=9, family="monospace", wrap=True)


def frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other beats on both cost (lower) and rate (higher), by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    best, keep = -np.inf, []
    for i in order:
        if points[i][1] > best:
            keep.append(i)
            best = points[i][1]
    return keep


def plot_plan(candidates, path: str, budget: tuple[str, float] | None = None) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 6.5))
    points = [(c.cost, c.rate) for c in candidates]
    labels: dict[tuple[float, float], list[str]] = {}
    for i, c in enumerate(candidates):
        color = KIND_COLORS.get(c.design.kind, "tab:purple")
        ax.scatter(c.cost, c.rate, s=160 if i == 0 else 50, marker="*" if i == 0 else "o",
                   facecolors=color if c.met else "none", edgecolors=color, zorder=3)
        labels.setdefault(points[i], []).append(f"{c.design} ({c.machines})")
    for (cost, rate), names in labels.items():   # candidates on the same spot share one label
        ax.annotate("\n".join(names), (cost, rate), textcoords="offset points", xytext=(5, 4), fontsize=7)
    met = [i for i, c in enumerate(candidates) if c.met]
    edge = [met[j] for j in frontier([points[i] for i in met])]
    if edge:
        ax.plot([points[i][0] for i in edge], [points[i][1] for i in edge], color="black", alpha=0.5,
                drawstyle="steps-post", label="frontier (SLOs met)")
    if budget and budget[0] == "cost_per_hour":
        ax.axvline(budget[1], color="tab:red", linestyle=":", label=f"budget {budget[1]:g}/h")
    for kind, color in KIND_COLORS.items():
        ax.scatter([], [], color=color, label=kind)
    ax.set(xlabel="cost per hour", ylabel="requests/s at the SLOs",
           title="candidates: cost against throughput (star: best; hollow: SLOs missed)")
    ax.grid(alpha=0.3)
    ax.margins(x=0.2, y=0.08)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=5, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
