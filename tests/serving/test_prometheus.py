"""A real Prometheus (Debian's `prometheus`, put in .venv/bin by hack/install-prometheus.sh) scrapes a live
local mode's router and workers and evaluates every PromQL expression the chart ships: the dashboard's
panels and variables, the vLLM recording rules, the KEDA triggers, the HPA adapter's rules and the builtin
autoscaler's queries. Each must return data (a value that is not NaN)."""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable

import pytest
import yaml
from support.polling import eventually, wait_for
from support.serving import manifest, post_json

from phasesplit.control import spec as si
from phasesplit.control.router_metrics import POOL_GAUGES, TBT, TTFT, WORKER_LOAD
from phasesplit.local.processes import ManagedProcess, free_port
from phasesplit.operator import builders, scaler_objects
from phasesplit.operator.metrics_source import PrometheusQuery, pool_query, quantile_query, router_selector

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "phasesplit"
RULES = CHART / "rules" / "vllm.yaml"
OWNER = builders.Owner("split", "ml", "u")   # the labels the chart's PodMonitor gives the cluster's series
SELECTOR = router_selector(OWNER.namespace, builders.service_name(OWNER))
RATE_WINDOW = "30s"   # $__rate_interval: the requests below fall in it
DATA_TIMEOUT = 30.0


def prometheus_binary() -> str | None:
    local = ROOT / ".venv" / "bin" / "prometheus"
    return os.environ.get("PROMETHEUS") or (str(local) if local.exists() else shutil.which("prometheus"))


pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not prometheus_binary(), reason="no Prometheus server: `make setup` installs Debian's (hack/install-prometheus.sh) "
    "where apt-get can download it; or set PROMETHEUS to a prometheus binary")]


def query(url: str, promql: str) -> list[dict]:
    """Raises on a query Prometheus refuses (a syntax or type error)."""
    with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}), timeout=5) as r:
        return json.loads(r.read())["data"]["result"]


def has_data(result: list[dict]) -> bool:
    return any(not math.isnan(float(r["value"][1])) for r in result)


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def prometheus(clusters, tmp_path_factory):
    """Scrapes the split cluster's router and workers every second, with the chart's vLLM rules loaded."""
    split, tmp_path = clusters[0], tmp_path_factory.mktemp("prometheus")
    labels = {"namespace": OWNER.namespace, "service": builders.service_name(OWNER)}
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(RULES)],
              "scrape_configs": [
                  {"job_name": "router", "static_configs": [
                      {"targets": [split.base_url.removeprefix("http://")], "labels": labels}]},
                  {"job_name": "workers", "static_configs": [
                      {"targets": split.metrics_addresses(), "labels": labels}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [prometheus_binary(), f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}"]
    proc = ManagedProcess("prometheus", argv, tmp_path).start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: ready(url) or not proc.alive(), timeout=30, what="Prometheus ready")
        assert proc.alive(), proc.log_tail()
        targets = 1 + len(split.metrics_addresses())
        # every target scraped once before the traffic: a rate() sees the counters rise from their value then
        wait_for(lambda: sum(float(r["value"][1]) for r in query(url, "up")) == targets, timeout=15,
                 what="Prometheus to scrape the router and every worker")
        yield url
    finally:
        proc.stop(5)


def dashboard_queries() -> dict[str, str]:
    dashboard = json.loads((CHART / "dashboards" / "phasesplit.json").read_text())
    variables = {"$namespace": OWNER.namespace, "$service": builders.service_name(OWNER),
                 "$__rate_interval": RATE_WINDOW}

    def substituted(expr: str) -> str:
        for name in sorted(variables, key=len, reverse=True):
            expr = expr.replace(name, variables[name])
        return re.sub(r"^label_values\((.*), \w+\)$", r"\1", expr)   # Grafana's: the series it reads labels of

    queries = {f"dashboard variable {v['name']}": substituted(v["definition"])
               for v in dashboard["templating"]["list"] if v["type"] == "query"}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            queries[f"dashboard {panel['title']!r} {target['refId']}"] = substituted(target["expr"])
    return queries


def rule_queries() -> dict[str, str]:
    rules = [r for group in yaml.safe_load(RULES.read_text())["groups"] for r in group["rules"]]
    queries = {f"recorded {r['record']}": r["record"] for r in rules}
    queries.update({   # what a vLLM dashboard asks of them
        "vLLM TTFT p90": f"histogram_quantile(0.9, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket"
                         f"[{RATE_WINDOW}])))",
        "vLLM tokens/s": f"sum(rate(vllm:generation_tokens_total[{RATE_WINDOW}]))",
    })
    return queries


def autoscaling_spec(mode: str, metric: str) -> si.SplitInferenceSpec:
    doc = manifest("split", {"prompt": 1, "token": 1})["spec"]
    doc["autoscaling"] = {"mode": mode, "prometheus": {"url": "http://prometheus:9090"}}
    for pool in doc["pools"].values():
        pool["autoscaling"] = {"minReplicas": 0, "maxReplicas": 2, "metric": metric,
                               "targetPerReplica": 0.5 if metric == "kvUtilization" else 4}
    return si.SplitInferenceSpec.model_validate(doc)


def keda_queries() -> dict[str, str]:
    queries = {}
    for metric in POOL_GAUGES:
        for scaled in scaler_objects.build_scaling_objects(OWNER, autoscaling_spec("keda", metric)):
            for trigger in scaled["spec"]["triggers"]:
                queries[f"KEDA {scaled['metadata']['name']} {trigger['name']}"] = trigger["metadata"]["query"]
    return queries


def hpa_adapter_queries(url: str) -> dict[str, str]:
    """The prometheus-adapter rules of AUTOSCALING.md, filled in for each External metric the HPAs ask for."""
    text = (CHART / "AUTOSCALING.md").read_text().split("## `hpa`: prometheus-adapter rules", 1)[1]
    rules = yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))["rules"]["external"]
    queries = {}
    for rule in rules:
        queries[f"adapter seriesQuery {rule['seriesQuery']}"] = rule["seriesQuery"]
        names = {r["metric"]["__name__"] for r in query(url, rule["seriesQuery"])}
        for metric in POOL_GAUGES:
            for hpa in scaler_objects.build_scaling_objects(OWNER, autoscaling_spec("hpa", metric)):
                external = hpa["spec"]["metrics"][0]["external"]["metric"]
                if external["name"] not in names:
                    continue
                matchers = {"namespace": OWNER.namespace, **external["selector"]["matchLabels"]}
                filled = rule["metricsQuery"].replace("<<.Series>>", external["name"]).replace(
                    "<<.LabelMatchers>>", ",".join(f'{k}="{v}"' for k, v in sorted(matchers.items())))
                queries[f"adapter {hpa['metadata']['name']} {external['name']}"] = filled
    return queries


def builtin_queries() -> dict[str, str]:
    queries = {f"builtin {metric}": pool_query(metric, SELECTOR) for metric in POOL_GAUGES}
    for histogram in (TTFT, TBT):
        queries[f"builtin {histogram} P90"] = quantile_query(histogram, SELECTOR, RATE_WINDOW)
    queries["builtin worker load"] = f"max by (worker) ({WORKER_LOAD}{{{SELECTOR}}})"
    return queries


def evaluate(url: str, queries: dict[str, str], timeout: float) -> dict[str, str]:
    """Polls each query until it returns data; what never did, with Prometheus' own answer."""
    deadline = time.monotonic() + timeout
    failures = {}
    for what, promql in queries.items():
        answer = wait_until(lambda: answered(url, promql), deadline)
        if answer is not True:
            failures[what] = f"{promql}\n    -> {answer}"
    return failures


def answered(url: str, promql: str):
    try:
        result = query(url, promql)
    except urllib.error.HTTPError as e:
        return f"refused: {e.read().decode()}"
    return True if has_data(result) else f"no data: {result}"


def wait_until(check: Callable[[], object], deadline: float):
    while True:
        answer = check()
        if answer is True or time.monotonic() > deadline:
            return answer
        time.sleep(0.2)


def test_every_query_the_chart_ships_returns_data_from_a_live_cluster(split, prometheus):
    for i in range(3):
        status, _ = post_json(f"{split.base_url}/v1/completions",
                              {"model": "tiny", "prompt": f"prometheus {i} " * 10, "max_tokens": 5, "ignore_eos": True})
        assert status == 200
    queries = {**dashboard_queries(), **rule_queries(), **keda_queries(), **builtin_queries()}
    failures = evaluate(prometheus, queries, DATA_TIMEOUT)
    adapter = hpa_adapter_queries(prometheus)
    assert len(adapter) >= 2 + 2 * len(POOL_GAUGES), adapter   # both rules, every metric for both pools
    failures.update(evaluate(prometheus, adapter, 5))
    assert not failures, "\n".join(f"{what}: {why}" for what, why in failures.items())
    assert len(queries) > 40


async def test_the_builtin_autoscaler_reads_the_cluster_through_prometheus(split, prometheus):
    status, _ = post_json(f"{split.base_url}/v1/completions",
                          {"model": "tiny", "prompt": "autoscaler " * 10, "max_tokens": 5, "ignore_eos": True})
    assert status == 200
    assert not evaluate(prometheus, {"TTFT": quantile_query(TTFT, SELECTOR)}, DATA_TIMEOUT)
    query = PrometheusQuery(prometheus, SELECTOR)

    async def scraped_after_the_request():   # a scrape during the token phase still counts it in flight
        snapshot = await query.read()
        return "token" in snapshot.pools and snapshot.pools["token"].inflight_requests == 0 and snapshot
    snapshot = await eventually(scraped_after_the_request, timeout=DATA_TIMEOUT, interval=0.5,
                                what="a scrape with the request finished")
    assert set(snapshot.pools) >= {"prompt", "token"}
    assert snapshot.pools["prompt"].ttft_p90_seconds is not None
    assert set(snapshot.worker_load) >= set(split.addresses("token"))
