"""phasesplit: phase-split LLM inference (prompt and token pools) on Kubernetes."""

import importlib.machinery
import importlib.metadata
import importlib.util
import pathlib
import sys

try:
    __version__ = importlib.metadata.version(__name__)
except importlib.metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

# `phasesplit.operator` is the top-level `operator/` folder, which has no __init__.py so that a
# Python started in the repository root never takes it for the standard library's `operator`.
# A wheel installs it as phasesplit/operator/; setuptools' editable install cannot map a folder
# without __init__.py (pypa/setuptools#4943), so a source checkout maps it here.
_SOURCE_OPERATOR = pathlib.Path(__file__).resolve().parent.parent / "operator"
if not (pathlib.Path(__file__).parent / "operator").is_dir() and (_SOURCE_OPERATOR / "main.py").is_file():
    _spec = importlib.machinery.ModuleSpec(f"{__name__}.operator", None, is_package=True)
    _spec.submodule_search_locations = [str(_SOURCE_OPERATOR)]
    sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
