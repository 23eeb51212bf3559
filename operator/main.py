"""`phasesplit operator`: run the kopf operator (handlers and the builtin autoscaler)."""

from __future__ import annotations

import argparse
import asyncio
import random

import kopf

DEFAULT_PEERING = "phasesplit"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="phasesplit operator", description=__doc__)
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    scope.add_argument("-n", "--namespace", action="append", default=[], help="watch only these namespaces")
    p.add_argument("--peering", default=DEFAULT_PEERING,
                   help="kopf peering object: replicas with one peering never reconcile at once")
    p.add_argument("--standalone", action="store_true", help="run without peering (one replica only)")
    p.add_argument("--priority", type=int, default=None,
                   help="peering priority; default random, so that exactly one replica is active")
    p.add_argument("--liveness", default=None, metavar="URL",
                   help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv or [])
    from phasesplit.operator import handlers
    handlers.WATCHED_NAMESPACES[:] = args.namespace
    registry = kopf.get_default_registry()  # with kopf's own login handlers
    handlers.register(registry)

    priority = args.priority if args.priority is not None else random.randint(1, 2**31 - 1)
    kopf.configure(verbose=args.verbose)
    asyncio.run(kopf.operator(
        registry=registry,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.standalone,
        peering_name=None if args.standalone else args.peering,
        priority=priority,
        liveness_endpoint=args.liveness,
    ))
    return 0
