"""The repository's example SplitInferences (manifests/examples/)."""

import pathlib

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))


def load_example(name: str) -> dict:
    return yaml.safe_load((ROOT / "manifests" / "examples" / f"{name}.yaml").read_text())
