"""The API key in local mode: `spec.router.apiKeySecret` names a Kubernetes Secret, which local mode
cannot read, so the key comes from `--api-key-file`, `--api-key` or the router's own variable."""

from __future__ import annotations

import argparse
import os
import pathlib

from phasesplit.control import spec as si

ENV = "PHASESPLIT_API_KEY"  # what the router reads its key from


def add_flags(p: argparse.ArgumentParser) -> None:
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key-file", metavar="FILE", help="require the API key in FILE as a bearer token "
                     f"(spec.router.apiKeySecret is not read in local mode; also: env {ENV})")
    key.add_argument("--api-key", metavar="KEY", help="require KEY as a bearer token (other users of the "
                     "machine can read a command line: prefer --api-key-file)")


def read(args: argparse.Namespace) -> str | None:
    """--api-key-file, --api-key or the environment's PHASESPLIT_API_KEY; None: no key is required."""
    if args.api_key_file:
        key = pathlib.Path(args.api_key_file).read_text().strip()
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file}: the file is empty")
        return key
    return args.api_key or os.environ.get(ENV) or None


def notice(spec: si.SplitInferenceSpec, api_key: str | None) -> str | None:
    """What the console says about the key: required, or asked for by the spec but not required."""
    if api_key:
        return "the router requires the API key (Authorization: Bearer KEY)"
    secret = spec.router.api_key_secret
    if secret is not None:
        return (f"warning: spec.router.apiKeySecret (Secret {secret.name}, key {secret.key}) is not read in local "
                f"mode, so the router takes requests without a key; pass --api-key-file FILE (or --api-key, or "
                f"{ENV}) to require one")
    return None
