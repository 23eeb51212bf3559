"""The Helm chart and manifests/: lint, render, the real Kubernetes schemas, generated files current."""

import subprocess
import sys

import kubernetes_validate
import pytest
import yaml
from support.examples import EXAMPLES, ROOT, load_example

from phasesplit.operator import crd
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
    rules = [r for o in render(helm) if o["kind"] == "ClusterRole" for r in o["rules"]]
    assert not [r for r in rules if "secrets" in r["resources"]]
    assert any("splitinferences/finalizers" in r["resources"] and r["verbs"] == ["update"] for r in rules)
    assert any("pods" in r["resources"] and {"list", "patch"} <= set(r["verbs"]) for r in rules)
