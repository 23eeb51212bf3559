import pathlib
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # tests.tools
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))


def load_example(name: str) -> dict:
    return yaml.safe_load((ROOT / "manifests" / "examples" / f"{name}.yaml").read_text())


@pytest.fixture(scope="session")
def helm() -> str:
    """The helm binary the project's setup installs (installed now if missing)."""
    binary = ROOT / ".venv" / "bin" / "helm"
    if not binary.exists():
        subprocess.run(["sh", str(ROOT / "hack" / "install-helm.sh")], cwd=ROOT, check=True)
    return str(binary)
