"""`phasesplit render`: the objects the operator would apply, without a cluster."""

import subprocess
import sys

import yaml
from support.examples import split_inference
from support.kube_emulator import OPERATOR_TOKEN, EmulatorThread
from support.operator_harness import kube_client

from phasesplit.operator import reconcile
from phasesplit.operator.apply import APPLIED_HASH, matches
from phasesplit.operator.kube import object_path


def render(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "phasesplit.cli", "render", *args], input=stdin,
                          capture_output=True, text=True, timeout=60)


def test_render_prints_what_the_operator_applies(tmp_path):
    doc = split_inference("chat", "ml", spec={"autoscaling": {"mode": "hpa"}})
    out = render("-", stdin=yaml.safe_dump(doc))
    assert out.returncode == 0, out.stderr
    objects = list(yaml.safe_load_all(out.stdout))
    with EmulatorThread() as server:
        admin = kube_client(server.url)
        body = admin.create(doc)
        outcome = reconcile.reconcile(kube_client(server.url, OPERATOR_TOKEN), body)
        applied = [name for name in outcome.applied if name != "Secret/chat-worker-token"]  # never rendered
        assert sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects) == sorted(applied)
        for obj in objects:
            live = admin.get(object_path(obj))
            obj["metadata"]["ownerReferences"][0]["uid"] = body["metadata"]["uid"]
            assert obj["metadata"]["annotations"].pop(APPLIED_HASH)  # it covers the owner's uid
            obj["metadata"] = {k: v for k, v in obj["metadata"].items() if v}
            assert matches(obj, live), obj["metadata"]["name"]
    pools = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] != "chat-router"]
    assert pools and all("replicas" not in o["spec"] for o in pools)  # the HPAs own them


def test_render_names_what_is_wrong(tmp_path):
    doc = split_inference("7b-chat")
    path = tmp_path / "si.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = render(str(path))
    assert out.returncode == 1 and "metadata.name" in out.stderr and out.stdout == ""
    doc = split_inference("chat", spec={"pools": {"token": {"engine": {"numKvBlocks": 4}}}})
    path.write_text(yaml.safe_dump(doc))
    out = render(str(path))
    assert out.returncode == 1 and "spec.pools.token.engine.numKvBlocks" in out.stderr
    assert render(str(tmp_path / "missing.yaml")).returncode == 2


def test_render_says_what_is_wrong_in_plain_words(tmp_path):
    path = tmp_path / "si.yaml"
    cases = [
        ({"pools": {"token": {"engine": {"maxNumSeq": 4}}}},
         "spec.pools.token.engine.maxNumSeq: unknown field; did you mean `maxNumSeqs`?"),
        ({"model": {"dtype": "fp8"}}, "spec.model.dtype: must be one of 'float32', 'float16' or 'bfloat16', got 'fp8'"),
        ({"pools": {"prompt": {"engine": {"blockSize": 32}}}},
         "the KV layout must match): prompt 32, token 16"),
    ]
    for spec, message in cases:
        path.write_text(yaml.safe_dump(split_inference("chat", spec=spec)))
        out = render(str(path))
        assert out.returncode == 1 and message in out.stderr, out.stderr
        assert f"phasesplit render: {path}: SplitInference 'chat': " in out.stderr
    path.write_text(yaml.safe_dump(split_inference("7b-chat")))
    out = render(str(path))
    assert "metadata.name: must be a DNS label" in out.stderr and "got '7b-chat'" in out.stderr
    assert "pattern" not in out.stderr and "^[a-z]" not in out.stderr


def test_a_yaml_error_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("kind: SplitInference\nmetadata:\n  name: x\n spec: [\n")
    out = render(str(path))
    assert out.returncode == 2
    assert out.stderr.startswith(f"phasesplit render: {path}: line 4, column 2: not valid YAML: "), out.stderr


def test_every_pattern_of_the_crd_has_words_for_people():
    from phasesplit.operator.crd import build_crd
    from phasesplit.validation import PATTERN_WORDS

    def patterns(node):
        if isinstance(node, dict):
            yield from ([node["pattern"]] if isinstance(node.get("pattern"), str) else [])
            for value in node.values():
                yield from patterns(value)
        elif isinstance(node, list):
            for value in node:
                yield from patterns(value)

    found = set(patterns(build_crd()))
    assert found and found <= set(PATTERN_WORDS), found - set(PATTERN_WORDS)
