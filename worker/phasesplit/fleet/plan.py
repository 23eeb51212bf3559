"""`phasesplit plan`: search designs and pool sizes for a workload, SLOs and a cost or power objective.

Designs: the non-split baseline (whole prefills pause the decodes, as in the Splitwise paper),
the non-split design with chunked prefill (vLLM's default), and split designs of each hardware
pairing. Objectives: `cost` or `power` (the cheapest, or lowest-power, design that meets the SLOs at the
workload's rate), or `throughput` (the highest rate at the SLOs within `--max-cost` or
`--max-power`, each design's pool ratio searched at the budget itself). Prints the ranked
candidates with their simulated figures and the rate each was sized at (`--json`: one JSON
document; `--plot FILE.png`: cost against throughput); `--emit FILE` writes the best one as a
SplitInference and says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

import yaml

from phasesplit.cli_format import HelpFormatter
from phasesplit.fleet import options
from phasesplit.fleet.emit import PLACEHOLDER_SOURCE, split_inference
from phasesplit.fleet.plan_output import document, emitted_line, render
from phasesplit.fleet.search import Candidate, Planner, designs
from phasesplit.fleet.sim import PoolSpec, SimConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="phasesplit plan", description=__doc__.splitlines()[0].split(": ", 1)[1],
                                formatter_class=HelpFormatter)
    options.add_workload(p)
    options.add_cluster_model(p)
    options.add_slos(p)
    g = p.add_argument_group("search")
    g.add_argument("--hardware", help="comma-separated hardware kinds on offer (default: every one profiled)")
    g.add_argument("--objective", choices=("cost", "power", "throughput"), default="cost",
                   help="what the best candidate minimizes (cost, power) or maximizes (throughput), SLOs met")
    g.add_argument("--max-cost", type=float, help="budget in cost per hour (throughput objective)")
    g.add_argument("--max-power", type=float, help="budget in watts (throughput objective)")
    g.add_argument("--max-machines", type=int, help="at most this many machines in any candidate")
    g.add_argument("--no-baseline", action="store_true", help="only split designs")
    g.add_argument("--no-split", action="store_true", help="only non-split designs")
    g.add_argument("--no-chunked", action="store_true", help="leave out the non-split designs with chunked prefill")
    g.add_argument("--chunked-prefill", type=int, metavar="BUDGET",
                   help="step budget of the chunked-prefill designs (default: --max-num-batched-tokens)")
    g.add_argument("--mixed", metavar="HW:N[-M]", help="give split designs a mixed pool of N machines of HW, "
                   "or search every size from N to M (0: no mixed pool)")
    g.add_argument("--sample", type=int, default=2000, help="requests simulated per candidate (with --rate)")
    g.add_argument("--top", type=int, default=10, help="candidates to print")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON document: every candidate, the best marked")
    o.add_argument("--plot", metavar="FILE.png", help="draw cost against throughput at the SLOs (needs matplotlib)")
    e = p.add_argument_group("emit")
    e.add_argument("--emit", metavar="FILE", help="write the best candidate as a SplitInference YAML ('-': stdout)")
    e.add_argument("--name", default="planned", help="metadata.name of the SplitInference")
    e.add_argument("--served-model-name", help="spec.model.name (default: --model)")
    e.add_argument("--source", help="model files: pvc:CLAIM[/PATH], hostPath:/DIR, image:REF (default: a "
                   f"placeholder, {PLACEHOLDER_SOURCE}, marked in the document)")
    return p.parse_args(argv)


def rank(candidates: list[Candidate], objective: str) -> list[Candidate]:
    key = {"cost": lambda c: (not c.met, c.cost, c.power), "power": lambda c: (not c.met, c.power, c.cost),
           "throughput": lambda c: (not c.met, -c.rate, c.cost)}[objective]
    return sorted(candidates, key=key)


def hardware_kinds(args: argparse.Namespace, planner: Planner) -> list[str]:
    profiled = sorted({hw for m, hw, tp in planner.profiles.keys() if m == args.model and tp == args.tp})
    if not args.hardware:
        return [hw for hw in profiled if hw in planner.profiles.catalog]
    kinds = [h.strip() for h in args.hardware.split(",") if h.strip()]
    for hw in kinds:
        if hw not in profiled or hw not in planner.profiles.catalog:
            raise ValueError(f"--hardware: {hw!r} has no profile for {args.model} at tp {args.tp} in the catalog "
                             f"(profiled: {', '.join(profiled)})")
    return kinds


def mixed_pool(text: str, kinds: list[str]) -> tuple[str, tuple[int, ...]]:
    """`HW:N` (one size) or `HW:N-M` (each size from N to M) -> (HW, sizes)."""
    hw, _, sizes = text.partition(":")
    low, _, high = sizes.partition("-")
    if hw not in kinds or not low.isdigit() or not (high or low).isdigit() or int(high or low) < max(int(low), 1):
        raise ValueError(f"--mixed: {text!r} is not HW:N or HW:N-M with HW one of {', '.join(kinds)}, "
                         "N <= M and M >= 1")
    return hw, tuple(range(int(low), int(high or low) + 1))


def budget(args: argparse.Namespace) -> tuple[str, float] | None:
    """(measure, limit) of the throughput objective's budget."""
    if args.objective != "throughput":
        return None
    return ("cost_per_hour", args.max_cost) if args.max_cost is not None else ("power_w", args.max_power)


def search(args: argparse.Namespace, planner: Planner) -> list[Candidate]:
    kinds = hardware_kinds(args, planner)
    mixed_hw, mixed_sizes = mixed_pool(args.mixed, kinds) if args.mixed else (None, ())
    found = []
    for design in designs(kinds, split=not args.no_split, baseline=not args.no_baseline, mixed=mixed_hw,
                          mixed_sizes=mixed_sizes, chunked=not args.no_chunked):
        if args.objective == "throughput":
            measure, limit = budget(args)
            c = planner.best_rate(design, measure, limit, args.rate or planner.trace.rate)
        else:
            c = planner.smallest(design, args.rate)
        if c is not None:
            found.append(c)
    return rank(found, args.objective)


def check(args: argparse.Namespace) -> None:
    if args.objective == "throughput" and (args.max_cost is None) == (args.max_power is None):
        raise ValueError("--objective throughput needs exactly one of --max-cost and --max-power")
    if args.sample < 100:
        raise ValueError(f"--sample: must be >= 100, got {args.sample}")
    if args.max_machines is not None and args.max_machines < 1:
        raise ValueError(f"--max-machines: must be >= 1, got {args.max_machines}")
    if args.json and args.emit == "-":
        raise ValueError("--json and --emit -: both would print to stdout; give --emit a file")


def sizes_trace(args: argparse.Namespace):
    """The requests' sizes (and arrivals for `--objective cost|power` without --rate). Under a budget
    --rate is only where the search starts, so the sizes do not depend on it."""
    if args.objective == "throughput" and args.trace:
        return options.workload(argparse.Namespace(**{**vars(args), "rate": None}))
    return options.workload(args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check(args)
        profiles = options.profiles(args)
        engine = options.engine_settings(args)
        chunk_budget = args.max_num_batched_tokens if args.chunked_prefill is None else args.chunked_prefill
        base = _base(args, engine)
        replace(base, chunked_prefill=chunk_budget)   # checks the budget
        planner = Planner(profiles, base, sizes_trace(args), options.slos(args), args.slo_reference,
                          num_requests=args.sample, seed=args.seed, chunk_budget=chunk_budget,
                          **({"max_machines": args.max_machines} if args.max_machines else {}))
        profiles.get(args.model, args.slo_reference, args.tp)
        candidates = search(args, planner)
        if not candidates:
            raise ValueError("no design meets the SLOs within the search's bounds")
        doc = None
        if args.emit:
            doc = split_inference(candidates[0], profiles, name=args.name, model=args.model,
                                  served_name=args.served_model_name or args.model, tp=args.tp,
                                  source=args.source, engine=engine, chunk_budget=chunk_budget)
        if args.plot:
            from phasesplit.fleet.plots import plot_plan
            plot_plan(candidates, args.plot, budget(args))
    except ValueError as e:
        print(f"phasesplit plan: error: {e}", file=sys.stderr)
        return 2
    out = sys.stderr if args.emit == "-" else sys.stdout
    emitted = None
    if doc is not None:
        text = yaml.safe_dump(doc, sort_keys=False)
        if args.emit == "-":
            print(text, end="")
        else:
            with open(args.emit, "w") as f:
                f.write(text)
        emitted = emitted_line(args.emit, doc, candidates[0])
    if args.json:
        print(json.dumps(document(args, planner, candidates, emitted), indent=2), file=out)
        return 0
    print(render(candidates[:args.top], args.objective), file=out)
    print(f"({planner.simulations} simulations; SLOs: {', '.join(map(str, planner.slos))}; "
          f"slowdowns against {args.slo_reference})", file=out)
    for line in filter(None, (emitted, args.plot and f"plotted {args.plot}")):
        print(line, file=out)
    return 0


def _base(args: argparse.Namespace, engine: dict) -> SimConfig:
    """Model and engine settings; each candidate brings its own pools in place of the placeholder."""
    return SimConfig(args.model, args.tp, (PoolSpec("mixed", "-", 1),), **engine)


if __name__ == "__main__":
    sys.exit(main())
