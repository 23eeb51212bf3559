"""One log format for every long-running command: `--log-format text|json` and `--log-level`."""

import io
import json
import logging
import signal
import subprocess
import sys
import urllib.request

import pytest

from phasesplit import logs
from phasesplit.local.launcher import parse_args as local_args
from phasesplit.operator.main import parse_args as operator_args
from phasesplit.roles.server import parse_args as worker_args
from phasesplit.router.main import build_parser as router_parser

FIELDS = {"ts", "level", "logger", "component", "message"}


@pytest.fixture
def captured():
    stream = io.StringIO()
    yield stream
    logging.getLogger().handlers.clear()


def test_json_lines_carry_the_fields_the_request_id_and_the_exception(captured):
    logs.configure("router", "DEBUG", "json", stream=captured)
    log = logging.getLogger("phasesplit.test")
    log.debug("plain %d", 1)
    log.info("about a request", extra={"request_id": "abc-1"})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("it failed")
    plain, about, failed = [json.loads(line) for line in captured.getvalue().splitlines()]
    assert set(plain) == FIELDS and plain["level"] == "DEBUG" and plain["message"] == "plain 1"
    assert plain["component"] == "router" and plain["logger"] == "phasesplit.test"
    assert plain["ts"].endswith("Z") and "T" in plain["ts"]
    assert about["request_id"] == "abc-1"
    assert failed["level"] == "ERROR" and "RuntimeError: boom" in failed["exception"]


def test_text_lines_name_the_component_and_the_request(captured):
    logs.configure("prompt-worker", "INFO", "text", stream=captured)
    log = logging.getLogger("phasesplit.test")
    log.debug("not shown")
    log.info("prefill", extra={"request_id": "abc-2"})
    log.info("request abc-3: named already", extra={"request_id": "abc-3"})
    first, second = captured.getvalue().splitlines()
    assert " INFO prompt-worker phasesplit.test: prefill [request_id=abc-2]" in first
    assert second.endswith("request abc-3: named already")


def test_every_long_running_command_takes_the_logging_flags():
    flags = ["--log-level", "debug", "--log-format", "json"]
    assert vars(router_parser().parse_args(["--served-model-name", "m", *flags])).items() >= {
        "log_level": "DEBUG", "log_format": "json"}.items()
    assert vars(local_args(["x.yaml", *flags])).items() >= {"log_level": "DEBUG", "log_format": "json"}.items()
    assert vars(operator_args(flags)).items() >= {"log_level": "DEBUG", "log_format": "json"}.items()
    config = worker_args(["--role", "mixed", "--model", "/m", *flags])   # the worker's config does not keep them
    assert config.role == "mixed" and logs.parse_logging_flags(["--role", "mixed", *flags]).log_format == "json"
    with pytest.raises(SystemExit):
        router_parser().parse_args(["--log-format", "xml"])


@pytest.mark.parametrize("value,sane", [("abc-123", True), ("trace:1/2.3~4+5=", True), ("x" * 128, True),
                                        ("x" * 129, False), ("", False), (None, False), ("a b", False),
                                        ("a\nb", False), ("ü", False)])
def test_only_a_short_plain_request_id_is_taken_from_the_client(value, sane):
    assert logs.sane_request_id(value) == (value if sane else None)


def test_a_router_process_logs_json_lines_with_the_request_id(tmp_path):
    argv = [sys.executable, "-m", "phasesplit.cli", "router", "--served-model-name", "tiny", "--pools", "mixed",
            "--host", "127.0.0.1", "--port", "0", "--log-format", "json", "--log-level", "DEBUG"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:   # in JSON mode even the "serving" banner is a log line
            lines.append(json.loads(line))
            if "serving 'tiny' on " in lines[-1]["message"]:
                break
        url = lines[-1]["message"].rsplit(" on ", 1)[1].removesuffix("/v1")
        request = urllib.request.Request(f"{url}/v1/models", headers={"X-Request-Id": "cli-test-1"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.headers["X-Request-Id"] == "cli-test-1"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, rest = proc.communicate(timeout=30)
    lines += [json.loads(line) for line in rest.splitlines()]
    assert all(FIELDS <= set(line) and line["component"] == "router" for line in lines)
    [access] = [line for line in lines if line.get("request_id") == "cli-test-1"]
    assert access["logger"] == "phasesplit.router.access" and access["message"].startswith("GET /v1/models 200 ")
    assert out == "" and proc.returncode == 0


def test_the_operators_lines_name_the_object_they_are_about(captured):
    logs.configure("operator", "INFO", "text", stream=captured)
    ref = {"namespace": "ml", "name": "chat", "kind": "SplitInference"}
    logging.getLogger("kopf.objects").info("reconciled", extra={"k8s_ref": ref})
    assert captured.getvalue().rstrip().endswith("operator kopf.objects: [ml/chat] reconciled")
    logs.configure("operator", "INFO", "json", stream=captured)
    logging.getLogger("kopf.objects").info("reconciled", extra={"k8s_ref": ref})
    assert json.loads(captured.getvalue().splitlines()[-1])["object"] == "ml/chat"
