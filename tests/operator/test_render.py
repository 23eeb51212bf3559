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
