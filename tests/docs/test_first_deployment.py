"""docs/first-deployment.md: each command it shows that can run without a cluster, checked. The
images' build files (the build args, the base images, every COPY source in the build context
that .dockerignore lets through), the YAML (the Kubernetes schemas, the CRD, `phasesplit render`,
applied to the API emulator with `kubectl`), the `helm install` values rendered, the names the
commands use, and the chart's NOTES."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

import kubernetes_validate
import pytest
import yaml
from support.crd_validator import validate
from support.examples import ROOT
from support.kube_emulator import ADMIN_TOKEN, OPERATOR_TOKEN, Emulator, EmulatorThread
from support.operator_harness import kube_client

from phasesplit.control import spec as si
from phasesplit.operator import crd, reconcile

GUIDE = (ROOT / "docs" / "first-deployment.md").read_text()
MODEL_NAMESPACE = "llm"  # where the guide puts the model's objects
K8S_VERSION = "1.37.0"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE, re.S)


def yaml_files() -> dict[str, list[dict]]:
    """The guide's YAML blocks by the file name each starts with (`# NAME.yaml`)."""
    files = {}
    for block in blocks("yaml"):
        name = re.match(r"# (\S+\.yaml)\n", block)
        assert name, f"a YAML block without its file name:\n{block}"
        files[name.group(1)] = [doc for doc in yaml.safe_load_all(block) if doc]
    return files


def commands() -> list[list[str]]:
    """Each shell line of the guide, split as the shell splits it ($REGISTRY expanded as exported)."""
    env = {}
    lines = []
    for block in blocks("sh"):
        for line in block.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            words = shlex.split(line.rstrip(" &"))
            if words[0] == "export" and "$(" not in line:
                key, value = words[1].split("=", 1)
                env[key] = value
                continue
            lines.append([re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)), w) for w in words])
    return lines


def without_namespace(words: list[str]) -> list[str]:
    """A kubectl command without its `-n NAMESPACE` (the namespace: `namespace_of`)."""
    if words[:1] != ["kubectl"] or "-n" not in words:
        return words
    i = words.index("-n")
    return words[:i] + words[i + 2:]


def namespace_of(words: list[str]) -> str | None:
    return words[words.index("-n") + 1] if "-n" in words else None


def commands_of(*prefix: str) -> list[list[str]]:
    """The commands that start with `prefix`, kubectl's `-n NAMESPACE` left out."""
    return [without_namespace(c) for c in commands() if without_namespace(c)[:len(prefix)] == list(prefix)]


def the_split_inference() -> dict:
    (doc,) = [d for docs in yaml_files().values() for d in docs if d["kind"] == "SplitInference"]
    return doc


# ---- the images ----

def dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path, or one of its parent folders, decides."""
    allowed = True
    parents = [path] + ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        regex = fnmatch.translate(pattern).replace(".*.*/", "(.*/)?")
        if any(re.fullmatch(regex, p) and (pattern.count("/") or "/" not in p or "**" in pattern)
               for p in parents):
            allowed = negate
    return allowed


def build_context() -> set[str]:
    """The repository files `docker build .` sends (git's tracked files, filtered by .dockerignore)."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    return {f for f in files if (ROOT / f).is_file() and dockerignore_allows(f, patterns)}


def parse_build(words: list[str]) -> dict:
    build = {"args": {}, "tags": []}
    rest = iter(words[2:])
    for word in rest:
        if word == "-f":
            build["file"] = next(rest)
        elif word == "-t":
            build["tags"].append(next(rest))
        elif word == "--build-arg":
            key, value = next(rest).split("=", 1)
            build["args"][key] = value
        else:
            build["context"] = word
    return build


def dockerfile_args(text: str) -> dict[str, str | None]:
    return {m.group(1): m.group(2) for m in re.finditer(r"^ARG (\w+)(?:=(\S+))?$", text, re.M)}


def test_the_docker_builds_name_real_files_args_and_sources():
    builds = [parse_build(c) for c in commands_of("docker", "build")]
    assert {b["file"] for b in builds} == {"worker/Dockerfile", "operator/Dockerfile"}
    context = build_context()
    for build in builds:
        assert build["context"] == "."
        text = (ROOT / build["file"]).read_text()
        declared = dockerfile_args(text)
        assert set(build["args"]) <= set(declared), f"{build['file']}: undeclared --build-arg"
        values = {**declared, **build["args"]}
        for image in re.findall(r"^FROM (\S+)", text, re.M):
            resolved = re.sub(r"\$\{(\w+):\+([^}]*)\}", lambda m: m.group(2) if values[m.group(1)].strip('"') else "",
                              image)
            resolved = re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)].strip('"'), resolved)
            assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", resolved), (
                f"{build['file']}: FROM {image} -> {resolved!r} (an image pinned by digest)")
        for sources in re.findall(r"^COPY (.+) \S+$", text, re.M):
            for source in sources.split():
                if source == ".":
                    continue
                assert source in context, f"{build['file']}: COPY {source} is not in the build context"


def test_the_build_context_holds_the_package_and_nothing_else():
    context = build_context()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert {"pyproject.toml", "requirements.txt", "constraints.txt", project["project"]["readme"]} <= context
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for package, folder in project["tool"]["setuptools"]["package-dir"].items():
        sources = {f for f in tracked if f.startswith(f"{folder}/") and f.endswith((".py", ".proto"))}
        assert sources and sources <= context, f"{package!r} ({folder}): {sorted(sources - context)[:5]}"
    assert not {f for f in context if f.startswith(("tests/", ".venv/", "bench/", ".git/")) or "__pycache__" in f}
    assert "phasesplit" in project["project"]["scripts"]  # the images' ENTRYPOINT


def test_what_is_pushed_is_what_was_built_and_what_the_yaml_and_helm_use():
    built = {tag for c in commands_of("docker", "build") for tag in parse_build(c)["tags"]}
    pushed = {c[2] for c in commands_of("docker", "push")}
    assert pushed == built
    images = the_split_inference()["spec"]["images"]
    assert {images["worker"], images["router"]} <= built
    (helm,) = commands_of("helm", "install")
    values = dict(helm[i + 1].split("=", 1) for i, w in enumerate(helm) if w == "--set")
    assert f"{values['operator.image.repository']}:{values['operator.image.tag']}" in built


# ---- the YAML ----

def test_every_file_a_command_uses_is_in_the_guide():
    files = yaml_files()
    used = [c[-1] for c in commands_of("kubectl", "apply", "-f")] + [c[-1] for c in commands_of("phasesplit", "render")]
    assert used and all(name in files for name in used), used


def test_the_yaml_validates_against_kubernetes_and_the_crd():
    schema = crd.build_crd()
    for name, docs in yaml_files().items():
        for doc in docs:
            if doc["kind"] == "SplitInference":
                assert validate(schema, doc) == [], name
                spec = si.SplitInference.model_validate(doc).spec
                assert si.feasibility_problems(spec) == []
            else:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_phasesplit_render_of_the_guides_file_prints_valid_objects(tmp_path):
    (command,) = commands_of("phasesplit", "render")
    (tmp_path / command[-1]).write_text(yaml.safe_dump_all(yaml_files()[command[-1]]))
    out = subprocess.run([sys.executable, "-m", "phasesplit.cli", *command[1:]], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for obj in yaml.safe_load_all(out.stdout):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        assert obj["metadata"]["namespace"] == namespace_of(command)


@pytest.fixture
def kubectl(monkeypatch, tmp_path):
    """`kubectl` against the API emulator. kubectl sends no token over plain HTTP, so the emulator
    takes a request without one as the administrator's (as a kind cluster's admin kubeconfig is)."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    authorize = Emulator._authorize
    monkeypatch.setattr(Emulator, "_authorize", lambda self, request: None if "Authorization" not in request.headers
                        and "authorization" not in request.headers else authorize(self, request))
    with EmulatorThread() as server:
        env = {**os.environ, "KUBECONFIG": str(server.kubeconfig(tmp_path / "kubeconfig", ADMIN_TOKEN))}

        def run(*args: str) -> str:
            out = subprocess.run(["kubectl", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                                 timeout=60)
            assert out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr}"
            return out.stdout

        run.server = server
        yield run


def test_the_guides_yaml_applies_and_the_operator_mounts_the_claim(kubectl, tmp_path):
    files = yaml_files()
    admin = kube_client(kubectl.server.url)
    for name, docs in files.items():
        (tmp_path / name).write_text(yaml.safe_dump_all(docs))
    applies = [c for c in commands() if without_namespace(c)[:3] == ["kubectl", "apply", "-f"]]
    namespace = MODEL_NAMESPACE
    for command in applies:
        assert namespace_of(command) == namespace
        for doc in files[command[-1]]:
            if doc["kind"] == "SplitInference":   # the guide's own command
                assert "created" in kubectl(*command[1:], "--validate=false")
                assert "unchanged" in kubectl(*command[1:], "--validate=false")
            else:   # the emulator's discovery lists only the API groups kubectl needs for the SplitInference
                admin.create({**doc, "metadata": {**doc["metadata"], "namespace": namespace}})
    name = the_split_inference()["metadata"]["name"]
    assert kubectl("-n", namespace, "get", "si", name, "-o", "name").strip() == f"splitinference.phasesplit.io/{name}"
    body = admin.get(f"/apis/phasesplit.io/v1alpha1/namespaces/{namespace}/splitinferences/{name}")
    outcome = reconcile.reconcile(kube_client(kubectl.server.url, OPERATOR_TOKEN), body)
    claim = the_split_inference()["spec"]["model"]["source"]["pvc"]["claimName"]
    assert any(doc["kind"] == "PersistentVolumeClaim" and doc["metadata"]["name"] == claim
               for docs in files.values() for doc in docs)
    for pool in ("prompt", "token"):
        assert f"Deployment/{name}-{pool}" in outcome.applied
        deployment = admin.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}-{pool}")
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        assert {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}} in volumes


# ---- the names the commands use ----

def test_the_commands_name_what_the_yaml_creates():
    doc = the_split_inference()
    name, spec = doc["metadata"]["name"], doc["spec"]
    text = "\n".join(" ".join(without_namespace(c)) for c in commands())
    secret = spec["router"]["apiKeySecret"]
    assert f"kubectl create secret generic {secret['name']} --from-literal={secret['key']}=" in text
    assert f"kubectl port-forward svc/{name} {spec['router']['service']['port']}:" in text
    assert f"kubectl get si {name} -w" in text and f"app.kubernetes.io/instance={name}" in text
    assert f"deploy/{name}-prompt" in GUIDE
    models = set(re.findall(r'"model": "([^"]+)"', text)) | set(re.findall(r'model="([^"]+)"', GUIDE))
    assert models == {spec["model"]["name"]}
    loader = [d for docs in yaml_files().values() for d in docs if d["kind"] == "Pod"][0]
    mount = loader["spec"]["containers"][0]["volumeMounts"][0]["mountPath"]
    copied = [c for c in commands_of("kubectl", "cp")][0][-1]
    assert copied == f"{loader['metadata']['name']}:{mount}/{spec['model']['source']['pvc']['path']}"


def test_the_metrics_the_guide_greps_for_are_the_routers():
    from phasesplit.router.metrics import RouterMetrics
    names = re.search(r'grep -E "\^phasesplit_\((.*?)\)"', GUIDE).group(1).split("|")
    exported = RouterMetrics().render().decode()
    assert all(re.search(rf"^phasesplit_{name}\b", exported, re.M) for name in names), names


def test_the_python_example_compiles():
    (example,) = blocks("python")
    compile(example, "first-deployment.md", "exec")


# ---- the chart ----

@pytest.fixture(scope="module")
def helm() -> str:
    binary = ROOT / ".venv" / "bin" / "helm"
    if not binary.exists():
        pytest.skip("helm is not installed (hack/install-helm.sh)")
    return str(binary)


def test_the_helm_install_renders_the_operator_the_guide_waits_for(helm):
    (install,) = commands_of("helm", "install")
    args = [w for w in install[2:] if w != "--create-namespace"]
    out = subprocess.run([helm, "template", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    objects = [o for o in yaml.safe_load_all(out.stdout) if o]
    namespace = install[install.index("-n") + 1]
    (rollout,) = [c for c in commands() if without_namespace(c)[:3] == ["kubectl", "rollout", "status"]]
    assert namespace_of(rollout) == namespace
    deployment = next(o for o in objects if o["kind"] == "Deployment"
                      and f"deployment/{o['metadata']['name']}" == rollout[-1])
    values = dict(install[i + 1].split("=", 1) for i, w in enumerate(install) if w == "--set")
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"{values['operator.image.repository']}:{values['operator.image.tag']}"
    assert any(o["kind"] == "CustomResourceDefinition" and o["metadata"]["name"] == "splitinferences.phasesplit.io"
               for o in objects)
    # the operator may work in the namespace the guide puts the model in
    assert values["operator.watchNamespaces"] == "{" + MODEL_NAMESPACE + "}"
    assert any(o["kind"] == "RoleBinding" and o["metadata"]["namespace"] == MODEL_NAMESPACE for o in objects)


def test_every_command_on_the_models_objects_names_their_namespace():
    for command in commands():
        if command[:1] == ["kubectl"] and "rollout" not in command and command[1:3] != ["create", "namespace"]:
            assert namespace_of(command) == MODEL_NAMESPACE, command
    assert ["kubectl", "create", "namespace", MODEL_NAMESPACE] in commands()


def test_the_charts_notes_send_people_to_a_volume_not_to_a_hostpath_example(helm, tmp_path):
    chart = tmp_path / "chart"
    shutil.copytree(ROOT / "charts" / "phasesplit", chart)
    (chart / "notes.txt").write_text((chart / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "notes.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n'
        '  notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}\n')
    out = subprocess.run([helm, "template", "phasesplit", str(chart), "-n", "phasesplit-system",
                          "--show-only", "templates/notes.yaml"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    notes = yaml.safe_load(out.stdout)["data"]["notes"]
    assert "kubectl apply -f manifests/examples/tiny-cpu.yaml" not in notes
    assert "docs/first-deployment.md" in notes and "PersistentVolumeClaim" in notes
    assert "svc.cluster.local:8000" in notes
