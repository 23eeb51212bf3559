"""`phasesplit operator`: run the kopf operator (handlers and the builtin autoscaler)."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re

from phasesplit.cli_format import HelpFormatter
from phasesplit.logs import add_logging_flags, configure
from phasesplit.operator import builders

DEFAULT_PEERING = "phasesplit"
DNS_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def cluster_domain(value: str) -> str:
    if len(value) > 253 or not DNS_NAME.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value!r}: a DNS domain is wanted (lowercase letters, digits, '-' and '.', e.g. cluster.local)")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="phasesplit operator", description=__doc__, formatter_class=HelpFormatter)
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
    p.add_argument("--cluster-domain", type=cluster_domain,
                   default=os.environ.get("PHASESPLIT_CLUSTER_DOMAIN", builders.CLUSTER_DOMAIN),
                   help="the cluster's DNS domain, in the addresses the router and status use "
                        "(env PHASESPLIT_CLUSTER_DOMAIN; default: %(default)s)")
    p.add_argument("--verbose", action="store_true", help="the same as --log-level DEBUG (kopf's debug messages too)")
    add_logging_flags(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv or [])
    import kopf  # here, not above: --help answers without loading kopf and the Kubernetes client
    from phasesplit.operator import handlers
    handlers.WATCHED_NAMESPACES[:] = args.namespace
    registry = kopf.get_default_registry()  # with kopf's own login handlers
    handlers.register(registry)

    priority = args.priority if args.priority is not None else random.randint(1, 2**31 - 1)
    kopf.configure(verbose=args.verbose)   # kopf's own logger settings; the lines take the one phasesplit format
    configure(component="operator", level="DEBUG" if args.verbose else args.log_level, fmt=args.log_format)
    asyncio.run(kopf.operator(
        registry=registry,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.standalone,
        peering_name=None if args.standalone else args.peering,
        priority=priority,
        liveness_endpoint=args.liveness,
        memo=kopf.Memo(cluster_domain=args.cluster_domain),
    ))
    return 0
