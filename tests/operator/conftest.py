import subprocess

import pytest

from support.examples import ROOT


@pytest.fixture(scope="session")
def helm() -> str:
    """The helm binary the project's setup installs (installed now if missing)."""
    binary = ROOT / ".venv" / "bin" / "helm"
    if not binary.exists():
        subprocess.run(["sh", str(ROOT / "hack" / "install-helm.sh")], cwd=ROOT, check=True)
    return str(binary)
