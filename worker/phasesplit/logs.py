"""One log format for every long-running command: `--log-format text|json` and `--log-level`.

JSON is one object per line: ts, level, logger, component, message, request_id (when the line is about a
request: `log.info(..., extra={"request_id": rid})`) and exception (the traceback, when there is one)."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")
LEVEL, FORMAT = "INFO", "text"  # the defaults
REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID_METADATA = "x-request-id"   # the same id on the router's calls to workers (gRPC metadata)
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:~+=/-]{1,128}")
_json_lines = False   # set by configure(): then announce() logs instead of printing
_configured = ("phasesplit", LEVEL, FORMAT)   # configure()'s arguments, for processes this one spawns


def configured() -> tuple[str, str, str]:
    """(component, level, format) as `configure` last set them: a spawned child calls `configure(*...)`."""
    return _configured


def add_logging_flags(parser: argparse.ArgumentParser, level: str = LEVEL, fmt: str = FORMAT) -> None:
    parser.add_argument("--log-level", default=level, choices=LEVELS, type=str.upper,
                        help="the least severe log lines written (default: %(default)s)")
    parser.add_argument("--log-format", default=fmt, choices=FORMATS,
                        help="text for people, json for log collectors: one object per line (default: %(default)s)")


def parse_logging_flags(argv: list[str]) -> argparse.Namespace:
    """Only the logging flags of a command line (for a command whose own parser does not keep them)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_logging_flags(parser)
    return parser.parse_known_args(argv)[0]


def without_logging_flags(options: dict) -> dict:
    return {k: v for k, v in options.items() if k not in ("log_level", "log_format")}


def logging_argv(args: argparse.Namespace) -> list[str]:
    """The flags that give a child process the same logging as this one."""
    return ["--log-level", args.log_level, "--log-format", args.log_format]


def configure_logging(args: argparse.Namespace, component: str) -> None:
    """Replaces the root logger's handlers with one on stderr in the chosen format."""
    configure(component, getattr(args, "log_level", LEVEL), getattr(args, "log_format", FORMAT))


def configure(component: str, level: str = LEVEL, fmt: str = FORMAT, stream=None) -> logging.Handler:
    global _json_lines, _configured
    _json_lines = fmt == "json"
    _configured = (component, level, fmt)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(component) if fmt == "json" else TextFormatter(component))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def announce(message: str) -> None:
    """A line for whoever started the command (stdout), or, in JSON mode, a log line like every other."""
    if _json_lines:
        logging.getLogger("phasesplit").info(message)
    else:
        print(message, flush=True)


class TextFormatter(logging.Formatter):
    """`2026-01-02 03:04:05,678 INFO router phasesplit.router.app: message [request_id=...]`"""

    def __init__(self, component: str):
        super().__init__(f"%(asctime)s %(levelname)s {component} %(name)s: %(object_prefix)s%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        obj = _object_of(record)
        record.object_prefix = f"[{obj}] " if obj else ""
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        if request_id and request_id not in record.getMessage():
            head, _, tail = line.partition("\n")
            line = f"{head} [request_id={request_id}]" + (f"\n{tail}" if tail else "")
        return line


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str):
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": _iso_time(record.created), "level": record.levelname, "logger": record.name,
                 "component": self.component, "message": record.getMessage()}
        if getattr(record, "request_id", None):
            entry["request_id"] = record.request_id
        if obj := _object_of(record):
            entry["object"] = obj
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


def _object_of(record: logging.LogRecord) -> str:
    """`namespace/name` of the object a kopf handler's logger is about, else ""."""
    ref = getattr(record, "k8s_ref", None)
    return "/".join(filter(None, (ref.get("namespace"), ref.get("name")))) if isinstance(ref, dict) else ""


def _iso_time(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def sane_request_id(value: str | None) -> str | None:
    """A client's X-Request-Id if it is short and plain enough to log and echo back, else None."""
    return value if value and _SANE_REQUEST_ID.fullmatch(value) else None


def request_id_from_metadata(context, default: str) -> str:
    """The router's X-Request-Id for a worker's gRPC call, else the request id the call carries."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_METADATA:
            return value
    return default
