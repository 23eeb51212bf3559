"""The images the chart and the operator run: base images pinned by digest, dependencies
installed from hashed lock files (hack/lock_requirements.py) that agree with the project's pins."""

import importlib.util
import re

import pytest
from support.examples import ROOT

DOCKERFILES = {"operator": ("PYTHON_IMAGE", "PYTHON_DIGEST"), "worker": ("BASE_IMAGE", "BASE_DIGEST")}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", re.M)


def pins(text: str) -> dict[str, str]:
    return {name.lower().replace("_", "-"): version for name, version in PIN.findall(text)}


@pytest.mark.parametrize("image", DOCKERFILES)
def test_the_base_image_is_pinned_by_digest_and_dependencies_are_installed_by_hash(image):
    text = (ROOT / image / "Dockerfile").read_text()
    base, digest = DOCKERFILES[image]
    assert re.search(rf"^ARG {digest}=sha256:[0-9a-f]{{64}}$", text, re.M), "the base image is not pinned"
    assert f"FROM ${{{base}}}${{{digest}:+@}}${{{digest}}}" in text
    assert f"COPY {image}/requirements.lock ./" in text and "pip install --require-hashes -r requirements.lock" in text
    assert "--no-deps --no-build-isolation ." in text  # the project itself: no unhashed build dependencies


@pytest.mark.parametrize("image", DOCKERFILES)
def test_every_locked_package_has_a_hash_and_the_projects_version(image):
    text = (ROOT / image / "requirements.lock").read_text()
    blocks = [b for b in re.split(r"\n(?=[A-Za-z0-9])", text) if PIN.match(b)]
    assert blocks and all("--hash=sha256:" in b for b in blocks)
    locked = pins(text)
    constrained = pins((ROOT / "constraints.txt").read_text())
    assert {n: v for n, v in locked.items() if n in constrained} == {n: constrained[n] for n in locked if n in constrained}
    assert "setuptools" in locked  # the build backend, for --no-build-isolation
    wanted = pins((ROOT / "requirements.txt").read_text())
    if image == "operator":
        wanted = {n: wanted[n] for n in ("kopf", "kubernetes", "pydantic", "pyyaml", "aiohttp", "prometheus-client")}
    assert wanted.items() <= locked.items()


def test_the_lock_lists_each_package_once_with_every_wheels_hash(tmp_path):
    spec = importlib.util.spec_from_file_location("lock_requirements", ROOT / "hack" / "lock_requirements.py")
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
    wheels = []
    for name, body in (("PyYAML-6.0.4-cp311-cp311-manylinux2014_x86_64.whl", b"a"),
                       ("PyYAML-6.0.4-cp312-cp312-manylinux2014_x86_64.whl", b"b"),
                       ("typing_extensions-4.16.0-py3-none-any.whl", b"c")):
        (tmp_path / name).write_bytes(body)
        wheels.append(tmp_path / name)
    text = lock.lock_text(wheels)
    assert pins(text) == {"pyyaml": "6.0.4", "typing-extensions": "4.16.0"}
    assert text.count("--hash=sha256:") == 3 and text.startswith(lock.HEADER)
