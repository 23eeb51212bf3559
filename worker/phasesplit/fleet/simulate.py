"""`phasesplit simulate`: a cluster of prompt, token and mixed pools serving a trace, simulated."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from phasesplit.cli_format import HelpFormatter
from phasesplit.fleet import options
from phasesplit.fleet.report import summarize, table
from phasesplit.fleet.sim import PoolSpec, SimConfig, simulate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="phasesplit simulate", description=__doc__.split(": ", 1)[1], formatter_class=HelpFormatter)
    options.add_workload(p)
    options.add_cluster_model(p)
    g = p.add_argument_group("cluster (N: 8-GPU machines of hardware HW; MIN-MAX makes the pool elastic)")
    g.add_argument("--prompt", metavar="HW:N[:MIN-MAX]", help="prompt pool")
    g.add_argument("--token", metavar="HW:N[:MIN-MAX]", help="token pool")
    g.add_argument("--mixed", metavar="HW:N[:MIN-MAX]", help="mixed pool, lent to the overloaded side")
    g.add_argument("--baseline", metavar="HW:N[:MIN-MAX]", help="non-split: every machine runs both phases")
    g.add_argument("--chunked-prefill", type=int, nargs="?", const=-1, default=0, metavar="BUDGET",
                   help="mixed and baseline instances run chunked prefill: each step takes the running decodes, "
                        "then prompt chunks up to BUDGET tokens (default: --max-num-batched-tokens)")
    g.add_argument("--startup-seconds", type=float, default=60.0, help="time for a new machine to serve")
    options.add_slos(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--plot", metavar="FILE.png", help="draw the latency CDFs against the SLOs and each pool's "
                   "utilisation and queue over time (needs matplotlib)")
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> SimConfig:
    if args.baseline and (args.prompt or args.token or args.mixed):
        raise ValueError("--baseline is the non-split design: give it alone, or --prompt and --token [--mixed]")
    pools = [PoolSpec.parse(role, text) for role, text in
             (("prompt", args.prompt), ("token", args.token), ("mixed", args.mixed or args.baseline)) if text]
    return SimConfig(model=args.model, tp=args.tp, pools=tuple(pools), startup_seconds=args.startup_seconds,
                     chunked_prefill=options.chunk_budget(args), **options.engine_settings(args))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        profiles = options.profiles(args)
        config = config_from(args)
        trace = options.workload(args)
        reference = profiles.get(args.model, args.slo_reference, args.tp)
        slos = options.slos(args)
        if args.plot:
            span = float(trace.arrival[-1] - trace.arrival[0]) if len(trace) > 1 else 1.0
            config = replace(config, timeline_interval=max(span / 300, 0.05))
        outcome = simulate(config, profiles, trace)
        summary = summarize(outcome, reference)
        summary["slos"] = {str(slo): {"value": slo.value(summary), "met": slo.met(summary)} for slo in slos}
        if args.plot:
            from phasesplit.fleet.plots import plot_simulation
            plot_simulation(outcome, summary, slos, reference, args.plot)
    except ValueError as e:
        print(f"phasesplit simulate: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(table(summary))
        print("SLOs: " + ", ".join(f"{name} {'met' if r['met'] else 'MISSED'} ({r['value']})"
                                   for name, r in summary["slos"].items()))
        if args.plot:
            print(f"plotted {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
