"""`phasesplit worker`: the command line is read before gRPC, torch and the engine are imported, so
that `--help` and a mistyped flag answer at once."""

from __future__ import annotations

import sys

from phasesplit.cli_format import HelpFormatter
from phasesplit.control.worker_config import WorkerConfig, build_parser
from phasesplit.logs import add_logging_flags, configure_logging, parse_logging_flags, without_logging_flags

DESCRIPTION = "`phasesplit worker --role prompt|token|mixed --model DIR ...`: one worker as a gRPC server."


def parse_args(argv: list[str]) -> WorkerConfig:
    """The command line as a `WorkerConfig`; flags left out take the config's defaults."""
    p = build_parser(prog="phasesplit worker", description=DESCRIPTION, formatter_class=HelpFormatter)
    add_logging_flags(p)
    try:
        return WorkerConfig(**without_logging_flags(vars(p.parse_args(argv))))
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = parse_args(argv)
    configure_logging(parse_logging_flags(argv), f"{config.role}-worker")
    from phasesplit.roles import server
    return server.run(config)
