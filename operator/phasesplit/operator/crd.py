"""The SplitInference CustomResourceDefinition, generated from the pydantic models in phasesplit.control.spec.

pydantic's JSON schema is turned into a Kubernetes structural schema: references inlined, optional
fields unwrapped, draft-2020 bounds rewritten in the OpenAPI v3 form, and object defaults added so
that the API server fills nested defaults exactly as pydantic does.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from phasesplit.control import spec as si

_KEEP = {"type", "properties", "required", "items", "additionalProperties", "description", "default", "enum",
         "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "pattern",
         "minItems", "maxItems", "maxProperties", "anyOf", "format", "nullable",
         "x-kubernetes-validations", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string"}

MAX_NAME_LENGTH = 45  # children append up to 18 characters and must stay within 63

PRINTER_COLUMNS = [
    {"name": "Prompt", "type": "string", "jsonPath": ".status.pools.prompt.ready",
     "description": "prompt workers ready/desired"},
    {"name": "Token", "type": "string", "jsonPath": ".status.pools.token.ready",
     "description": "token workers ready/desired"},
    {"name": "Mixed", "type": "string", "jsonPath": ".status.pools.mixed.ready",
     "description": "mixed workers ready/desired"},
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _model_classes(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every model reachable from root, by class name (the keys of pydantic's `$defs`)."""
    found: dict[str, type[BaseModel]] = {}
    stack = [root]
    while stack:
        cls = stack.pop()
        if cls.__name__ in found:
            continue
        found[cls.__name__] = cls
        for field in cls.model_fields.values():
            for arg in _type_args(field.annotation):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    stack.append(arg)
    return found


def _type_args(annotation: Any) -> list[Any]:
    args = [annotation]
    for sub in getattr(annotation, "__args__", ()) or ():
        args += _type_args(sub)
    return args


def _object_defaults(cls: type[BaseModel]) -> dict[str, Any]:
    """Defaults for fields filled by a model factory: `{}` lets the API server apply nested defaults."""
    out = {}
    for name, field in cls.model_fields.items():
        factory = field.default_factory
        if factory is None:
            continue
        alias = field.alias or name
        if isinstance(factory, type) and issubclass(factory, BaseModel):
            out[alias] = {}
        elif isinstance(value := factory(), BaseModel):
            out[alias] = value.model_dump(by_alias=True, exclude_none=True, mode="json")
    return out


def _structural(node: Any, defs: dict, classes: dict[str, type[BaseModel]]) -> Any:
    if not isinstance(node, dict):
        return node
    node = dict(node)
    class_name = None
    if "$ref" in node:
        class_name = node.pop("$ref").rsplit("/", 1)[-1]
        node = {**copy.deepcopy(defs[class_name]), **node}
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        variants = [v for v in node.pop("anyOf") if v.get("type") != "null"]
        if len(variants) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {variants}")
        if node.get("default", ...) is None:
            node.pop("default")
        inner = _structural(variants[0], defs, classes)
        return _structural({**inner, **node}, defs, classes)
    if node.get("default", ...) is None:
        node.pop("default")
    if isinstance(node.get("exclusiveMinimum"), (int, float)) and not isinstance(node["exclusiveMinimum"], bool):
        node["minimum"], node["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if isinstance(node.get("exclusiveMaximum"), (int, float)) and not isinstance(node["exclusiveMaximum"], bool):
        node["maximum"], node["exclusiveMaximum"] = node["exclusiveMaximum"], True
    if node.get("additionalProperties") is False:
        node.pop("additionalProperties")
    out = {k: v for k, v in node.items() if k in _KEEP}
    if "properties" in out:
        out["properties"] = {k: _structural(v, defs, classes) for k, v in out["properties"].items()}
        if class_name is None:
            class_name = node.get("title")
        if class_name in classes:
            for key, default in _object_defaults(classes[class_name]).items():
                out["properties"][key].setdefault("default", default)
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = _structural(out[key], defs, classes)
    if "anyOf" in out:
        out["anyOf"] = [{k: v for k, v in variant.items() if k in _KEEP} for variant in out["anyOf"]]
    return out


def spec_schema() -> dict:
    """The structural OpenAPI v3 schema of `.spec`."""
    raw = si.SplitInferenceSpec.model_json_schema(by_alias=True)
    defs = raw.pop("$defs", {})
    classes = _model_classes(si.SplitInferenceSpec)
    return _structural({**raw, "title": "SplitInferenceSpec"}, defs, classes)


def build_crd() -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{si.PLURAL}.{si.API_GROUP}"},
        "spec": {
            "group": si.API_GROUP,
            "scope": "Namespaced",
            "names": {"kind": si.KIND, "listKind": f"{si.KIND}List", "plural": si.PLURAL,
                      "singular": si.KIND.lower(), "shortNames": ["si"], "categories": ["phasesplit"]},
            "versions": [{
                "name": si.API_VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "A model served split into a prompt (prefill) pool and a token (decode) pool.",
                    "required": ["spec"],
                    "x-kubernetes-validations": [si.cel(
                        f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
                        f"metadata.name must be at most {MAX_NAME_LENGTH} characters (children add suffixes)"),
                        si.cel(f"self.metadata.name.matches('{si.RFC1035_LABEL}')",
                               "metadata.name must be an RFC 1035 label (lower-case letters, digits and '-', "
                               "starting with a letter): it names the router Service")],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec_schema(),
                        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                    },
                }},
            }],
        },
    }
