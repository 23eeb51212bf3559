"""The repository's example SplitInferences (manifests/examples/), and the one builder of test manifests."""

import pathlib

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))


def load_example(name: str) -> dict:
    return yaml.safe_load((ROOT / "manifests" / "examples" / f"{name}.yaml").read_text())


def merged(base: dict, edits: dict) -> dict:
    """`base` with `edits` merged in, as a JSON merge patch does (None deletes a key)."""
    for key, value in edits.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            merged(base[key], value)
        else:
            base[key] = value
    return base


def split_inference(name: str = "tiny", namespace: str | None = None, spec: dict | None = None,
                    example: str = "tiny-cpu") -> dict:
    """A SplitInference document: an example renamed, its spec merged with `spec`."""
    doc = load_example(example)
    doc["metadata"] = {"name": name, **({"namespace": namespace} if namespace else {})}
    merged(doc["spec"], spec or {})
    return doc
