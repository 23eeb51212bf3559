"""`phasesplit worker`: the command line is read before gRPC, torch and the engine are imported, so
that `--help` and a mistyped flag answer at once."""

from __future__ import annotations

import sys

from phasesplit.cli_format import HelpFormatter
from phasesplit.control.worker_config import WorkerConfig, build_parser

DESCRIPTION = "`phasesplit worker --role prompt|token|mixed --model DIR ...`: one worker as a gRPC server."


def parse_args(argv: list[str]) -> WorkerConfig:
    """The command line as a `WorkerConfig`; flags left out take the config's defaults."""
    p = build_parser(prog="phasesplit worker", description=DESCRIPTION, formatter_class=HelpFormatter)
    try:
        return WorkerConfig(**vars(p.parse_args(argv)))
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> int:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    from phasesplit.roles import server
    return server.run(config)
