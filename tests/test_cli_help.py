"""The `phasesplit` command line: --version, the usage, and every command's --help (fast, no torch,
every flag explained with its default)."""

import argparse
import importlib
import subprocess
import sys

import pytest

import phasesplit
from phasesplit import cli
from phasesplit.cli_format import HelpFormatter


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "phasesplit.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"phasesplit {phasesplit.__version__}"


def test_plain_phasesplit_fails_with_the_usage():
    result = run_cli()
    assert result.returncode == 2
    assert result.stderr.startswith("usage: phasesplit") and "worker" in result.stderr and "--version" in result.stderr


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    assert all(name in result.stdout for name in cli.COMMANDS)


NO_TORCH = """
import sys
from phasesplit import cli
try:
    cli.main([sys.argv[1], "--help"])
except SystemExit as e:
    assert e.code == 0, e.code
print("torch imported" if "torch" in sys.modules else "no torch")
"""


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_command_help_imports_no_torch(command):
    result = subprocess.run([sys.executable, "-c", NO_TORCH, command], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"usage: phasesplit {command}" in result.stdout
    assert result.stdout.strip().endswith("no torch")


class _Parsed(Exception):
    pass


def parser_of(command: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a command builds, caught as it parses (no command runs)."""
    caught = []

    def catch(self, args=None, namespace=None):
        caught.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    module = importlib.import_module(cli.COMMANDS[command][0])
    with pytest.raises(_Parsed):
        module.main(["--help"])
    return caught[0]


def _flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_flag_has_help_and_shows_its_default(command, monkeypatch):
    parser = parser_of(command, monkeypatch)
    assert parser.formatter_class is HelpFormatter
    formatter = parser._get_formatter()
    for action in _flags(parser):
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"{command} {name}: no help text"
        if action.default not in (None, False, [], argparse.SUPPRESS):
            assert "default" in formatter._expand_help(action), f"{command} {name}: default not shown"
