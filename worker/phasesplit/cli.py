"""`phasesplit` console script: one subcommand per component, each imported only when used."""

import importlib
import sys

import phasesplit
from phasesplit import parent_death

COMMANDS = {
    "make-tiny-model": ("phasesplit.tiny_model", "create a random-weight Llama checkpoint with a real tokenizer"),
    "generate": ("phasesplit.generate", "one-shot generation with the engine"),
    "worker": ("phasesplit.roles.command", "run a prompt, token or mixed worker (gRPC)"),
    "router": ("phasesplit.router.main", "run the OpenAI-compatible router (HTTP)"),
    "local": ("phasesplit.local.launcher", "run a SplitInference as local processes"),
    "operator": ("phasesplit.operator.main", "run the Kubernetes operator (kopf)"),
    "render": ("phasesplit.operator.render", "print every object the operator would apply for a SplitInference"),
    "profile": ("phasesplit.fleet.profile", "measure the engine's iteration times into a profile table"),
    "simulate": ("phasesplit.fleet.simulate", "simulate a cluster serving a trace (performance model)"),
    "plan": ("phasesplit.fleet.plan", "search pool sizes and hardware for SLOs and cost; emit a SplitInference"),
}


def usage() -> str:
    lines = ["usage: phasesplit [--version] [--help] COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`phasesplit COMMAND --help` shows a command's flags and their defaults."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"phasesplit {phasesplit.__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"phasesplit: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    parent_death.arm_from_env()
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
