"""The Helm chart and manifests/: lint, render, the real Kubernetes schemas, generated files current."""

import re
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml
from support.examples import EXAMPLES, ROOT, load_example

from phasesplit.operator import crd, main
from support.crd_validator import validate

CHART = str(ROOT / "charts" / "phasesplit")
K8S_VERSION = "1.37.0"


def render(helm, *sets: str) -> list[dict]:
    args = [helm, "template", "phasesplit", CHART, "--namespace", "phasesplit-system"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_helm_lint_is_clean(helm):
    result = subprocess.run([helm, "lint", "--strict", CHART], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout


@pytest.mark.parametrize("sets", [(), ("operator.replicas=2",), ("operator.watchNamespaces={models,staging}",),
                                  ("rbac.clusterWide=true",), ("operator.image.digest=sha256:" + "0" * 64,),
                                  ("crds.enabled=false", "serviceAccount.create=false", "serviceAccount.name=ops")])
def test_rendered_objects_validate_against_kubernetes_openapi(helm, sets):
    for obj in render(helm, *sets):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_crds_are_gated_and_kept_on_uninstall(helm):
    crds = [o for o in render(helm) if o["kind"] == "CustomResourceDefinition"]
    assert {c["metadata"]["name"] for c in crds} == {
        "splitinferences.phasesplit.io", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    assert all(c["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for c in crds)
    assert not [o for o in render(helm, "crds.enabled=false") if o["kind"] == "CustomResourceDefinition"]
    chart_crd = next(c for c in crds if c["metadata"]["name"] == "splitinferences.phasesplit.io")
    assert chart_crd["spec"] == crd.build_crd()["spec"]


def test_operator_pod_has_liveness_and_peering(helm):
    deployment = next(o for o in render(helm, "operator.replicas=2") if o["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--peering=phasesplit" in container["args"] and "--standalone" not in container["args"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert any(a.startswith("--liveness=http://0.0.0.0:8080/healthz") for a in container["args"])
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "--cluster-domain=cluster.local" in container["args"]


def test_the_cluster_domain_is_a_value_checked_by_chart_and_operator(helm):
    deployment = next(o for o in render(helm, "operator.clusterDomain=corp.example") if o["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert main.parse_args(args[1:]).cluster_domain == "corp.example"
    bad = subprocess.run([helm, "template", "x", CHART, "--set", "operator.clusterDomain=Corp_Example"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "clusterDomain" in bad.stderr
    with pytest.raises(SystemExit):
        main.parse_args(["--cluster-domain", "Corp_Example"])


def test_values_schema_and_contradictions_fail_with_the_field_named(helm):
    bad = subprocess.run([helm, "template", "x", CHART, "--set", "operator.replicas=-1"], capture_output=True, text=True)
    assert bad.returncode != 0 and "replicas" in bad.stderr
    contradiction = subprocess.run([helm, "template", "x", CHART, "--set", "operator.replicas=2",
                                    "--set", "operator.peeringName="], capture_output=True, text=True)
    assert contradiction.returncode != 0 and "operator.peeringName" in contradiction.stderr


def test_every_rbac_rule_is_commented():
    text = (ROOT / "charts" / "phasesplit" / "templates" / "rbac.yaml").read_text().splitlines()
    rules = [i for i, line in enumerate(text) if line.strip().startswith("- apiGroups:")]
    assert rules and all(text[i - 1].strip().startswith("#") or text[i - 2].strip().startswith("#") for i in rules)


def test_generated_files_are_up_to_date(helm):
    result = subprocess.run([sys.executable, str(ROOT / "hack" / "render_manifests.py"), "--check"],
                            capture_output=True, text=True, env={"HELM": helm, "PATH": ""})
    assert result.returncode == 0, result.stderr


def test_manifests_validate_against_kubernetes_openapi():
    docs = [d for p in sorted((ROOT / "manifests").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    assert {d["kind"] for d in docs} >= {"Namespace", "CustomResourceDefinition", "ClusterRole", "Deployment"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_validate_against_the_crd(path):
    assert validate(crd.build_crd(), load_example(path.stem)) == []


def test_the_operator_reads_no_secrets_and_may_block_owner_deletion(helm):
    rules = [r for o in render(helm) if o["kind"] in ("ClusterRole", "Role") for r in o["rules"]]
    # It makes each SplitInference's worker-token Secret, and can neither read nor change one.
    secret_verbs = [r["verbs"] for r in rules if "secrets" in r["resources"]]
    assert secret_verbs and all(verbs == ["create"] for verbs in secret_verbs)
    assert any("splitinferences/finalizers" in r["resources"] and r["verbs"] == ["update"] for r in rules)
    assert any("pods" in r["resources"] and {"list", "patch"} <= set(r["verbs"]) for r in rules)


def render_with(helm, *args: str) -> list[dict]:
    out = subprocess.run([helm, "template", "phasesplit", CHART, "--namespace", "phasesplit-system", *args],
                         check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_a_pod_monitor_gives_router_series_the_labels_every_query_selects(helm):
    from phasesplit.operator import builders
    from phasesplit.operator.metrics_source import router_selector
    assert not [o for o in render(helm) if o["kind"] == "PodMonitor"]  # auto: the CRD is not served
    has_crd = ("--api-versions", "monitoring.coreos.com/v1/PodMonitor")
    assert not [o for o in render_with(helm, *has_crd, "--set", "monitoring.podMonitor.enabled=false")
                if o["kind"] == "PodMonitor"]
    (monitor,) = [o for o in render_with(helm, *has_crd) if o["kind"] == "PodMonitor"]
    router_pod = builders.labels(builders.Owner("chat", "ml", "u"), "router")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= router_pod.items()
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
            "targetLabel": "service"} in endpoint["relabelings"]
    # The label the relabeling sets is the SplitInference's name, which is what the queries select.
    assert router_selector("ml", builders.service_name(builders.Owner("chat", "ml", "u"))) == \
        f'namespace="ml",service="{router_pod["app.kubernetes.io/instance"]}"'
    forced = [o for o in render_with(helm, "--set", "monitoring.podMonitor.enabled=true") if o["kind"] == "PodMonitor"]
    assert len(forced) == 1


def exported_series() -> set[str]:
    """Every series name the router and the workers export (a histogram's and a counter's samples too)."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from phasesplit.roles.metrics import EngineCollector
    from phasesplit.router.metrics import RouterMetrics
    stats = SimpleNamespace(waiting_requests=1, running_requests=1, used_blocks=1, free_blocks=1, total_blocks=2,
                            num_preemptions=1, prefix_cache_queries=2, prefix_cache_hits=1)
    core = SimpleNamespace(loop=SimpleNamespace(stats=stats), settings=SimpleNamespace(served_model_name="m"),
                           role="token")
    workers = CollectorRegistry()
    workers.register(EngineCollector(core))
    exported = set()
    for text in (RouterMetrics("m").render(), generate_latest(workers)):
        for family in text_string_to_metric_families(text.decode()):
            exported |= {family.name, f"{family.name}_total", f"{family.name}_bucket", f"{family.name}_sum",
                         f"{family.name}_count"}
    return exported


def vllm_rules(helm) -> list[dict]:
    has_crd = ("--api-versions", "monitoring.coreos.com/v1/PrometheusRule")
    assert not [o for o in render_with(helm, *has_crd) if o["kind"] == "PrometheusRule"]   # off by default
    (rule,) = [o for o in render_with(helm, "--set", "monitoring.vllmRules.enabled=true") if o["kind"] == "PrometheusRule"]
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def test_the_dashboard_queries_only_series_the_router_and_workers_export(helm):
    import json
    import re

    (config_map,) = [o for o in render(helm) if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["phasesplit.json"])
    exported = exported_series()
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for word in ("queue", "workers", "first token", "between tokens", "end-to-end", "kv transfer", "utilisation",
                 "by outcome", "tokens per second", "engine queue", "kv cache usage", "preemptions",
                 "prefix cache hit rate"):
        assert word in titles, word
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = set(re.findall(r"\b(phasesplit_[a-z_]+)\{", target["expr"]))
            assert names and names <= exported, (panel["title"], names - exported)
            assert 'namespace="$namespace",service="$service"' in target["expr"]


def test_the_vllm_recording_rules_read_exported_series_and_name_vllms(helm):
    rules = vllm_rules(helm)
    exported = exported_series()
    for rule in rules:
        assert set(re.findall(r"\b(phasesplit_[a-z_]+)", rule["expr"])) <= exported, rule
    recorded = {r["record"] for r in rules}
    for histogram in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert {f"vllm:{histogram}_{part}" for part in ("bucket", "sum", "count")} <= recorded
    assert {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc",
            "vllm:prompt_tokens_total", "vllm:generation_tokens_total"} <= recorded
    documented = (ROOT / "docs" / "metrics.md").read_text()
    assert all(f"`{name.removesuffix('_bucket')}`" in documented for name in recorded if not name.endswith(("_sum", "_count")))
