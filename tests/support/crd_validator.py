"""Validates a custom resource against a CRD offline, as the API server would: structural
defaults first, then the OpenAPI schema (jsonschema), then the CEL rules (cel-python)."""

from __future__ import annotations

import copy

import celpy
import jsonschema


def apply_defaults(schema: dict, obj):
    if isinstance(obj, dict):
        for key, prop in (schema.get("properties") or {}).items():
            if key not in obj and "default" in prop:
                obj[key] = copy.deepcopy(prop["default"])
        for key, value in obj.items():
            sub = (schema.get("properties") or {}).get(key)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                apply_defaults(sub, value)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for item in obj:
            apply_defaults(schema["items"], item)
    return obj


def _cel_errors(schema: dict, obj, where: str, env: celpy.Environment) -> list[str]:
    errors = []
    for rule in schema.get("x-kubernetes-validations") or []:
        program = env.program(env.compile(rule["rule"]))
        try:
            ok = bool(program.evaluate({"self": celpy.json_to_cel(obj)}))
        except celpy.CELEvalError as e:  # e.g. a missing field: the schema check reports it
            ok, rule = False, {**rule, "message": f"{rule['message']} ({e})"}
        if not ok:
            errors.append(f"{where}{rule.get('fieldPath', '')}: {rule['message']}".lstrip("."))
    if isinstance(obj, dict):
        for key, value in obj.items():
            sub = (schema.get("properties") or {}).get(key)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                errors += _cel_errors(sub, value, f"{where}.{key}", env)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            errors += _cel_errors(schema["items"], item, f"{where}[{i}]", env)
    return errors


def validate(crd: dict, obj: dict) -> list[str]:
    """Every error, each starting with the path of the offending field (e.g. `spec.pools.token`)."""
    version = next(v for v in crd["spec"]["versions"] if f"{crd['spec']['group']}/{v['name']}" == obj["apiVersion"])
    schema = version["schema"]["openAPIV3Schema"]
    obj = apply_defaults(schema, copy.deepcopy(obj))
    validator = jsonschema.Draft4Validator(schema)
    errors = [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
              for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]
    if errors:
        return errors
    return _cel_errors(schema, obj, "", celpy.Environment())
