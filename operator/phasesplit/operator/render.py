"""`phasesplit render FILE.yaml`: print, as YAML, every object the operator would apply for each
SplitInference in FILE (the operator's own builders, no cluster), to review or diff an upgrade.
Not the worker-token Secret: the operator makes it once, with a fresh token, and never shows it."""

from __future__ import annotations

import argparse
import sys

import pydantic
import yaml

from phasesplit.cli_format import HelpFormatter
from phasesplit.control import spec as si
from phasesplit.operator import builders
from phasesplit.operator.apply import stamped
from phasesplit.operator.main import cluster_domain
from phasesplit.operator.reconcile import autoscaled
from phasesplit.validation import one_line, yaml_problem


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="phasesplit render", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("file", help="YAML with one or more SplitInference documents ('-': standard input)")
    p.add_argument("-n", "--namespace", default=None,
                   help="namespace for documents that name none (default: 'default')")
    p.add_argument("--cluster-domain", type=cluster_domain, default=builders.CLUSTER_DOMAIN,
                   help="the cluster's DNS domain, as the operator's --cluster-domain (default: %(default)s)")
    return p.parse_args(argv)


def rendered(doc: dict, namespace: str | None = None, domain: str = builders.CLUSTER_DOMAIN) -> list[dict]:
    """What the operator applies for one SplitInference document; ValueError names what is wrong.
    Owner references carry no uid: the API server assigns it when the SplitInference is created."""
    try:
        resource = si.SplitInference.model_validate(doc)
    except pydantic.ValidationError as e:
        raise ValueError(one_line(e, si.SplitInference)) from None
    if problems := si.feasibility_problems(resource.spec):
        raise ValueError("; ".join(f"spec.{p}" for p in problems))
    owner = builders.Owner(resource.metadata.name, resource.metadata.namespace or namespace or "default", "", domain)
    return [stamped(child, autoscaled(child, resource.spec))
            for child in builders.build_children(owner, resource.spec)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv or [])
    try:
        text = sys.stdin.read() if args.file == "-" else open(args.file).read()
        docs = [d for d in yaml.safe_load_all(text) if d]
    except OSError as e:
        print(f"phasesplit render: {args.file}: {e.strerror or e}", file=sys.stderr)
        return 2
    except yaml.YAMLError as e:
        print(f"phasesplit render: {yaml_problem(args.file, e)}", file=sys.stderr)
        return 2
    objects = []
    for doc in docs:
        name = (doc.get("metadata") or {}).get("name", "?") if isinstance(doc, dict) else "?"
        try:
            if not isinstance(doc, dict) or doc.get("kind") != si.KIND:
                raise ValueError(f"kind: expected {si.KIND}")
            objects += rendered(doc, args.namespace, args.cluster_domain)
        except ValueError as e:
            print(f"phasesplit render: {args.file}: SplitInference {name!r}: {e}", file=sys.stderr)
            return 1
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False))
    return 0
