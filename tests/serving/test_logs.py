"""Local mode with `--log-format json`: the router and every worker write JSON lines, and a request's
X-Request-Id is on the router's access line and on the lines of both workers that served it."""

import json
import urllib.request

import pytest
from support.polling import wait_for
from support.serving import manifest

from phasesplit.local import plan as local_plan
from phasesplit.local.launcher import LocalCluster
from phasesplit.local.processes import free_port

JSON_FLAGS = ("--log-level", "INFO", "--log-format", "json")


@pytest.fixture
def json_cluster(tiny_model_dir, tmp_path):
    doc = local_plan.validate_manifest(manifest("json-logs", {"prompt": 1, "token": 1}))
    plan = local_plan.build_plan(doc, str(tiny_model_dir), port=free_port(), drain_timeout=10)
    cluster = LocalCluster(plan, tmp_path, ready_timeout=180, log_flags=JSON_FLAGS)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop(15)


def json_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def lines_with(path, request_id: str) -> list[dict]:
    return [line for line in json_lines(path) if line.get("request_id") == request_id]


def test_router_and_workers_log_json_lines_with_the_request_id(json_cluster, tmp_path):
    body = json.dumps({"model": "tiny", "prompt": "Hello there", "max_tokens": 4, "ignore_eos": True}).encode()
    request = urllib.request.Request(f"{json_cluster.endpoint}/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json", "X-Request-Id": "local-json-1"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert reply.headers["X-Request-Id"] == "local-json-1"
        assert json.loads(reply.read())["usage"]["completion_tokens"] == 4
    router_log = json_cluster.router.log_path
    [access] = wait_for(lambda: lines_with(router_log, "local-json-1"), what="the router's access line")
    assert access["component"] == "router" and access["message"].startswith("POST /v1/completions 200 ")
    for pool in ("prompt", "token"):
        [worker] = json_cluster.workers[pool]
        [line] = wait_for(lambda: lines_with(worker.proc.log_path, "local-json-1"), what=f"the {pool} worker's line")
        assert line["component"] == f"{pool}-worker" and line["logger"] == f"phasesplit.roles.{pool}"
        assert {"ts", "level", "logger", "component", "message"} <= set(line)
    for log in tmp_path.glob("*.log"):   # every line of every process is JSON: json_lines would raise
        assert json_lines(log), log
