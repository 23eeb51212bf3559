"""The repository's layout must not break Python started in its root."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_repository_root_does_not_shadow_the_standard_library():
    # `python -c` puts the current directory first on sys.path: a top-level `operator/` package
    # there would replace the standard library's `operator`, which enum, re and yaml import. `-S`
    # keeps site from importing `operator` first (a bare interpreter, as in a fresh venv).
    site_packages = [p for p in sys.path if p.endswith("site-packages")]
    code = f"import sys; sys.path += {site_packages!r}; import enum, operator, re, yaml; print(operator.__file__)"
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not out.stdout.strip().startswith(str(ROOT))


def test_operator_is_importable_as_part_of_the_package():
    code = "import phasesplit.operator.main, phasesplit.operator.builders"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_no_package_is_mapped_onto_a_folder_at_import_time():
    # The source roots are plain setuptools package-dirs; nothing rewrites sys.modules on import.
    code = "import sys, phasesplit; print(sorted(m for m in sys.modules if m.startswith('phasesplit')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['phasesplit']"
