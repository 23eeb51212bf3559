"""`phasesplit local` says what is wrong with a manifest as `phasesplit render` does, before starting anything,
and passes its logging flags on to the router and workers it starts."""

import subprocess
import sys

import pytest
import yaml
from support.examples import split_inference

from phasesplit.local.launcher import LocalCluster
from phasesplit.local.plan import build_plan, read_manifest, validate_manifest


def local(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "phasesplit.cli", "local", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("spec,message", [
    ({"pools": {"token": {"engine": {"maxNumSeq": 4}}}},
     "spec.pools.token.engine.maxNumSeq: unknown field; did you mean `maxNumSeqs`?"),
    ({"pools": {"token": {"replicas": -1}}}, "spec.pools.token.replicas: must be greater than or equal to 0, got -1"),
    ({"router": {"resources": {"requests": {"cpu": "lots"}}}},
     "spec.router.resources.requests: 'lots' is not a Kubernetes quantity"),
])
def test_a_bad_field_is_one_line_naming_the_file_and_the_field(tmp_path, spec, message):
    path = tmp_path / "si.yaml"
    path.write_text(yaml.safe_dump(split_inference("chat", spec=spec)))
    out = local(str(path))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"phasesplit local: {path}: SplitInference 'chat': {message}"), out.stderr
    assert len(out.stderr.splitlines()) == 1


def test_a_yaml_error_or_a_missing_file_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("kind: SplitInference\nmetadata:\n  name: x\n spec: [\n")
    out = local(str(path))
    assert out.returncode == 2
    assert out.stderr == f"phasesplit local: {path}: line 4, column 2: not valid YAML: expected <block end>, " \
                         "but found '<block mapping start>'\n"
    with pytest.raises(ValueError, match=f"^{tmp_path / 'missing.yaml'}: No such file or directory$"):
        read_manifest(tmp_path / "missing.yaml")
    path.write_text("- a list\n- not a manifest\n")
    with pytest.raises(ValueError, match="no document with kind: SplitInference"):
        read_manifest(path)


def test_children_log_as_the_launcher_does(tmp_path, tiny_model_dir):
    doc = split_inference("chat", spec={"model": {"source": {"hostPath": {"path": "/unused"}}}})
    plan = build_plan(validate_manifest(doc), str(tiny_model_dir), port=0)
    cluster = LocalCluster(plan, tmp_path, log_flags=("--log-level", "DEBUG", "--log-format", "json"))
    argv = cluster.router_argv(8000)
    assert argv[argv.index("--log-format") + 1] == "json" and argv[argv.index("--log-level") + 1] == "DEBUG"
