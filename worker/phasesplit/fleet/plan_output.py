"""What `phasesplit plan` prints: the ranked table, or one JSON document; and what `--emit` wrote."""

from __future__ import annotations

import argparse

from phasesplit.fleet.search import COLOCATED, Candidate, Planner


def sizes(c: Candidate) -> str:
    text = f"{c.prompt}" if c.design.kind in COLOCATED else f"{c.prompt}+{c.token}"
    return text + (f"+{c.design.mixed_machines}" if c.design.mixed_machines else "")


def render(candidates: list[Candidate], objective: str = "cost") -> str:
    lines = [f"{'#':>2} {'design':<36}{'machines':>10}{'$/h':>9}{'kW':>8}{'req/s':>8}{'sized@':>8}{'TTFT90':>8}"
             f"{'TBT90':>8}{'E2E90':>8}{'hit':>6}  SLOs"]
    for i, c in enumerate(candidates, 1):
        s = c.summary
        hit = f"{s['prefix_hit_ratio']:.0%}" if s.get("prefix_caching") else "-"
        lines.append(f"{i:>2} {str(c.design):<36}{sizes(c):>10}{c.cost:>9.1f}{c.power / 1000:>8.1f}"
                     f"{c.rate:>8.2f}{c.sized_at or c.rate:>8.2f}{s['ttft_s']['p90'] or 0:>8.3f}"
                     f"{s['tbt_s']['p90'] or 0:>8.3f}{s['e2e_s']['p90'] or 0:>8.2f}{hit:>6}"
                     f"  {'met' if c.met else 'missed'}{' !' if s.get('warnings') else ''}")
    warned = next((c for c in candidates if c.summary.get("warnings")), None)
    if warned is not None:
        lines.append(f"(!: priced beyond the profile's measured points, e.g. {warned.design}: "
                     f"{'; '.join(warned.summary['warnings'])})")
    if objective == "throughput":
        lines.append("(req/s: the highest Poisson rate at the SLOs within the budget; sized@: the rate at which "
                     "the pools' ratio was found)")
    else:
        lines.append("(each design's fewest machines at the workload's rate, sized@)")
    return "\n".join(lines)


def candidate_entry(rank: int, c: Candidate, planner: Planner) -> dict:
    d = c.design
    if d.kind in COLOCATED:
        hardware, machines = {"mixed": d.prompt_hw}, {"mixed": c.prompt}
    else:
        hardware, machines = {"prompt": d.prompt_hw, "token": d.token_hw}, {"prompt": c.prompt, "token": c.token}
        if d.mixed_machines:
            hardware["mixed"], machines["mixed"] = d.mixed_hw, d.mixed_machines
    return {
        "rank": rank, "best": rank == 1, "design": str(d), "kind": d.kind,
        "chunked_prefill": planner.chunk_budget if d.kind == "chunked" else 0,
        "hardware": hardware, "machines": machines, "total_machines": c.machines,
        "cost_per_hour": c.cost, "power_w": c.power, "rate_rps": round(c.rate, 4),
        "sized_at_rps": round(c.sized_at or c.rate, 4), "met": c.met,
        "slos": {str(slo): {"value": slo.value(c.summary), "met": slo.met(c.summary)} for slo in planner.slos},
        "simulation": c.summary,
    }


def document(args: argparse.Namespace, planner: Planner, candidates: list[Candidate], emitted: str | None) -> dict:
    measure = ("cost_per_hour" if args.max_cost is not None else "power_w") if args.objective == "throughput" else None
    return {
        "objective": args.objective,
        "budget": {"measure": measure, "limit": args.max_cost if args.max_cost is not None else args.max_power}
        if measure else None,
        "max_machines": planner.max_machines,
        "slos": [str(s) for s in planner.slos], "slo_reference": planner.reference,
        "requests_per_simulation": planner.num_requests, "simulations": planner.simulations,
        "candidates": [candidate_entry(i, c, planner) for i, c in enumerate(candidates, 1)],
        "emitted": emitted,
    }


def emitted_line(path: str, doc: dict, best: Candidate) -> str:
    """One sentence: where the SplitInference went, what it holds, and whether its source is a placeholder."""
    pools = ", ".join(f"{role} {pool['replicas']} replicas" + _nodes(pool["nodeSelector"])
                      for role, pool in doc["spec"]["pools"].items())
    where = "stdout" if path == "-" else path
    line = f"wrote {where}: SplitInference {doc['metadata']['name']} ({best.design}: {pools})"
    note = doc["metadata"].get("annotations", {}).get("phasesplit.io/placeholder-source")
    return line + (f"; NOTE {note} (--source)" if note else "")


def _nodes(selector: dict) -> str:
    return f" on {','.join(f'{k}={v}' for k, v in selector.items())}" if selector else ""
