"""Command-line options shared by `phasesplit simulate` and `phasesplit plan`."""

from __future__ import annotations

import argparse

from phasesplit.router.cache_routing import LEAST_LOADED, POLICIES
from phasesplit.fleet.perf import Profiles
from phasesplit.fleet.report import PAPER_SLOS, Slo
from phasesplit.fleet.trace import Trace, load_trace, redraw, synthetic


def add_workload(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--trace", metavar="FILE|NAME", help="Azure-format CSV (TIMESTAMP, ContextTokens, GeneratedTokens), "
                   "Mooncake-format JSON lines (timestamp, input_length, output_length, hash_ids), or a bundled "
                   "one: code, conv, mooncake-conv, mooncake-synthetic")
    g.add_argument("--synthetic", metavar="PROMPT:OUTPUT", help="sizes in tokens, each N or LOW-HIGH (needs --rate)")
    g.add_argument("--rate", type=float, help="re-draw arrivals as Poisson at this many requests/s")
    g.add_argument("--requests", type=int, help="number of requests (default: the trace's)")
    g.add_argument("--seed", type=int, default=0, help="seed of the synthetic sizes and the Poisson arrivals")


def add_cluster_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and profiles")
    g.add_argument("--model", default="llama2-70b", help="model name in the profile table")
    g.add_argument("--tp", type=int, default=8, help="tensor-parallel size of one engine instance")
    g.add_argument("--profiles", metavar="CSV", help="profile table (default: the bundled Splitwise one)")
    g.add_argument("--catalog", metavar="FILE", help="machine catalog, JSON or YAML (default: the bundled one)")
    g.add_argument("--mixed-profiles", metavar="CSV", help="mixed-step table (phasesplit profile --mixed-out) that "
                   "prices chunked-prefill steps (default: a model derived from the profile table)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="largest batch of an instance")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="prefill token budget")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--serialized-kv", action="store_true", help="send the KV after the prefill, not layer by layer")
    g.add_argument("--routing", metavar="|".join(POLICIES), default=LEAST_LOADED,
                   help="the router's policy (spec.router.routing.policy): cacheAware sends a request where its "
                        "prefix is cached, leastLoaded to the shortest queue")
    g.add_argument("--local-prefill-tokens", type=int, default=0, metavar="N",
                   help="cacheAware split serving: a token worker prefills a request itself when at most N of its "
                        "prompt tokens are not in its cache (conditional disaggregation; 0: never)")
    g.add_argument("--no-prefix-cache", action="store_true",
                   help="instances keep no prefix cache (only traces with block hashes have one)")


def add_slos(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slo", action="append", default=[], metavar="METRIC.Q=LIMIT",
                   help="e.g. ttft.p90=3x (slowdown) or e2e.p99=20s (repeatable; default: the Splitwise paper's)")
    p.add_argument("--slo-reference", default="a100-80gb", metavar="HW",
                   help="hardware whose uncontended run slowdowns are measured against")


def workload(args: argparse.Namespace) -> Trace:
    if bool(args.trace) == bool(args.synthetic):
        raise ValueError("give exactly one of --trace and --synthetic")
    if args.requests is not None and args.requests < 1:
        raise ValueError(f"--requests: must be >= 1, got {args.requests}")
    if args.synthetic:
        if not args.rate:
            raise ValueError("--synthetic needs --rate")
        return synthetic(args.synthetic, args.rate, args.requests or 1000, args.seed)
    trace = load_trace(args.trace)
    if args.rate is not None:
        return redraw(trace, args.rate, args.requests, args.seed)
    if args.requests is not None:
        trace = trace.head(args.requests)
    return trace


def profiles(args: argparse.Namespace) -> Profiles:
    return Profiles(args.profiles, args.catalog, mixed=args.mixed_profiles)


def slos(args: argparse.Namespace) -> tuple[Slo, ...]:
    return tuple(Slo.parse(s) for s in args.slo) or PAPER_SLOS


def engine_settings(args: argparse.Namespace) -> dict:
    if args.local_prefill_tokens < 0:
        raise ValueError(f"--local-prefill-tokens: must be >= 0, got {args.local_prefill_tokens}")
    for name in ("tp", "max_num_seqs", "max_num_batched_tokens", "block_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    return {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
            "block_size": args.block_size, "layerwise": not args.serialized_kv, "routing": args.routing,
            "prefix_caching": not args.no_prefix_cache, "local_prefill_tokens": args.local_prefill_tokens}


def chunk_budget(args: argparse.Namespace) -> int:
    """--chunked-prefill's step budget: 0 (off), the value given, or --max-num-batched-tokens."""
    return args.max_num_batched_tokens if args.chunked_prefill == -1 else args.chunked_prefill
