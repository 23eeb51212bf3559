"""The Splitwise paper's cluster comparison, reproduced with the bundled traces and profiles, and
the designs a user would run instead.

For the coding and the conversation trace: the non-split A100 and H100 baselines (whole prefills
first, the paper's), the same machines with chunked prefill (vLLM's default), and split designs
(H100 prompts with A100 tokens, all H100, all A100, H100 prompts with power-capped H100 tokens),
each at the cost and at the power of 40 DGX-H100 machines, throughput at the paper's SLOs
(Poisson arrivals, request sizes from the trace) and its ratio to the H100 baseline measured in
the same run. Then prefix caching: on the Mooncake conversation trace and the Azure coding trace
at the cost of 20 DGX-H100, the old baseline, chunked colocated and split designs, each with
caching off (leastLoaded routing, no prefix cache) and on (cacheAware routing over per-instance
LRU caches). Also the simulator's own speed (100,000 requests on 40 machines) and the mixed
pool's effect at equal cost.

    python bench/fleet.py [--sample 8000] [--traces code,conv] [--cache-traces mooncake-conv,code]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

from phasesplit.fleet.perf import Profiles
from phasesplit.fleet.report import PAPER_SLOS, summarize
from dataclasses import replace

from phasesplit.router.cache_routing import CACHE_AWARE, LEAST_LOADED
from phasesplit.fleet.search import Design, Planner
from phasesplit.fleet.sim import PoolSpec, SimConfig, simulate
from phasesplit.fleet.trace import Trace, load_trace, redraw

DESIGNS = {
    "Baseline-A100": Design("baseline", "a100-80gb"),
    "Baseline-H100": Design("baseline", "h100-80gb"),
    "Chunked-A100": Design("chunked", "a100-80gb"),
    "Chunked-H100": Design("chunked", "h100-80gb"),
    "Splitwise-HA": Design("split", "h100-80gb", "a100-80gb"),
    "Splitwise-HH": Design("split", "h100-80gb", "h100-80gb"),
    "Splitwise-AA": Design("split", "a100-80gb", "a100-80gb"),
    "Splitwise-HHcap": Design("split", "h100-80gb", "h100-80gb-pcap"),
}
MACHINES = 40   # budgets: what 40 DGX-H100 cost and draw
CACHE_MACHINES = 20
CACHE_DESIGNS = ("Baseline-H100", "Chunked-H100", "Splitwise-HA", "Splitwise-HH")


def speed(profiles: Profiles) -> None:
    trace = redraw(load_trace("conv"), 40.0, 100_000, seed=0)
    config = SimConfig("llama2-70b", 8, (PoolSpec("prompt", "h100-80gb", 25), PoolSpec("token", "a100-80gb", 15)))
    start = time.perf_counter()
    out = simulate(config, profiles, trace)
    elapsed = time.perf_counter() - start
    done = sum(1 for f in out.finish if not math.isnan(f))
    print(f"simulator: {done:,} of {len(trace):,} requests on 40 machines (conv, 40 req/s) in {elapsed:.1f} s "
          f"({len(trace) / elapsed:,.0f} requests/s; target: under 120 s)")


def mixed_pool(profiles: Profiles) -> None:
    """A mixed pool in place of prompt machines, at equal cost, on the bursty traces replayed faster."""
    print("\n== mixed pool: trace timing compressed, 4 prompt machines swapped for 4 mixed (equal cost)")
    print(f"{'trace':<6}{'req/s':>7}  {'design':<24}{'TTFT P50':>9}{'TTFT P90':>9}{'TBT P90':>9}{'E2E P90':>9}"
          f"{'mixed util':>11}")
    reference = profiles.get("llama2-70b", "a100-80gb", 8)
    for name, factor, prompt, token in (("code", 60, 30, 6), ("conv", 15, 16, 16)):
        full = load_trace(name)
        trace = Trace(full.arrival / factor, full.prompt, full.output)
        for mixed in (0, 4):
            pools = (PoolSpec("prompt", "h100-80gb", prompt - mixed), PoolSpec("token", "a100-80gb", token))
            pools += (PoolSpec("mixed", "h100-80gb", mixed),) if mixed else ()
            s = summarize(simulate(SimConfig("llama2-70b", 8, pools), profiles, trace), reference)
            design = f"{prompt - mixed}P+{token}T" + (f"+{mixed}M" if mixed else "")
            util = s["pools"].get("mixed", {}).get("utilization")
            print(f"{name:<6}{trace.rate:>7.1f}  {design:<24}{s['ttft_s']['p50']:>9.3f}{s['ttft_s']['p90']:>9.3f}"
                  f"{s['tbt_s']['p90']:>9.3f}{s['e2e_s']['p90']:>9.2f}{'-' if util is None else f'{util:.0%}':>11}")


def compare(profiles: Profiles, trace_name: str, sample: int, reference_rate: float) -> None:
    planner = Planner(profiles, SimConfig("llama2-70b", 8, (PoolSpec("mixed", "-", 1),)), load_trace(trace_name),
                      PAPER_SLOS, "a100-80gb", num_requests=sample, seed=1)
    h100 = profiles.catalog["h100-80gb"]
    budgets = {"cost": ("cost_per_hour", MACHINES * h100.cost_per_hour),
               "power": ("power_w", MACHINES * h100.power_w)}
    print(f"\n== {trace_name}: throughput at the SLOs, budgets of {MACHINES} DGX-H100 "
          f"(${budgets['cost'][1]:,.0f}/h, {budgets['power'][1] / 1000:,.0f} kW)")
    print(f"{'design':<16}" + "".join(f"{'iso-' + b + ' machines':>22}{'req/s':>8}{'x H100':>8}"
                                                      for b in budgets))
    results: dict[str, dict[str, tuple]] = {}
    for name, design in DESIGNS.items():
        row = {}
        for b, (measure, limit) in budgets.items():
            best = planner.best_rate(design, measure, limit, reference_rate)
            row[b] = (best.prompt, best.token, best.rate) if best else (0, 0, 0.0)
        results[name] = row
    base = results["Baseline-H100"]
    for name, row in results.items():
        cells = ""
        for b in budgets:
            prompt, token, rate = row[b]
            sizes = f"{prompt}" if DESIGNS[name].kind != "split" else f"{prompt}P+{token}T"
            cells += f"{sizes:>22}{rate:>8.1f}{rate / base[b][2] if base[b][2] else math.nan:>8.2f}"
        print(f"{name:<16}{cells}")
    print(f"({planner.simulations} simulations of {sample} requests each; each design sized where it fills the "
          f"budget, searched from {reference_rate} req/s)")


def caching(profiles: Profiles, trace_name: str, sample: int, reference_rate: float) -> None:
    """At the cost of CACHE_MACHINES DGX-H100: each design's top rate with caching off and on."""
    limit = CACHE_MACHINES * profiles.catalog["h100-80gb"].cost_per_hour
    trace = load_trace(trace_name)
    print(f"\n== {trace_name}: prefix caching, throughput at the SLOs within ${limit:,.0f}/h "
          f"({CACHE_MACHINES} DGX-H100){'' if trace.blocks else '; this trace has no block hashes: nothing to cache'}")
    print(f"{'design':<16}" + "".join(f"{label + ' machines':>18}{'req/s':>8}{'hit':>6}{'GB/req':>8}"
                                      for label in ("off", "on")))
    for name in CACHE_DESIGNS:
        cells = ""
        for routing, cached in ((LEAST_LOADED, False), (CACHE_AWARE, True)):
            base = replace(SimConfig("llama2-70b", 8, (PoolSpec("mixed", "-", 1),)), routing=routing,
                           prefix_caching=cached)
            planner = Planner(profiles, base, trace, PAPER_SLOS, "a100-80gb", num_requests=sample, seed=1)
            best = planner.best_rate(DESIGNS[name], "cost_per_hour", limit, reference_rate)
            if best is None:
                cells += f"{'-':>18}{'-':>8}{'-':>6}{'-':>8}"
                continue
            s = best.summary
            sizes = f"{best.prompt}" if DESIGNS[name].kind != "split" else f"{best.prompt}P+{best.token}T"
            moved = s["kv_bytes_moved"] / 1e9 / max(s["completed"], 1)
            cells += f"{sizes:>18}{best.rate:>8.2f}{s['prefix_hit_ratio']:>6.0%}{moved:>8.2f}"
        print(f"{name:<16}{cells}")
    print(f"({sample} requests per simulation, Poisson arrivals; Mooncake traces keep their requests' order)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sample", type=int, default=8000, help="requests per simulation")
    p.add_argument("--traces", default="code,conv")
    p.add_argument("--reference-rate", type=float, default=10.0)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-mixed", action="store_true")
    p.add_argument("--cache-traces", default="mooncake-conv,code")
    p.add_argument("--cache-sample", type=int, default=3000, help="requests per simulation of the caching runs")
    args = p.parse_args()
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}")
    profiles = Profiles()
    if not args.skip_speed:
        speed(profiles)
    if not args.skip_mixed:
        mixed_pool(profiles)
    start = time.perf_counter()
    for name in filter(None, args.traces.split(",")):
        compare(profiles, name, args.sample, args.reference_rate)
    print(f"\ncomparison took {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    for name in filter(None, args.cache_traces.split(",")):
        caching(profiles, name, args.cache_sample, args.reference_rate)
    print(f"\ncaching runs took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
