"""Idempotent apply of one child: server-side apply under one field manager, and nothing sent
when the live object already holds what would be applied.

The applied object carries a hash of itself (`APPLIED_HASH`), so a field dropped from the desired
object changes the hash and is applied (the server then removes it); a pass whose desired objects
are unchanged and whose live objects hold them (quantities compared by value, as the server
rewrites them) sends no writes. When an autoscaler owns a Deployment's `spec.replicas`, the
operator leaves the field out; if it owned the field before (a switch from `mode: none`), it first
hands it to `SCALER_MANAGER` at its live value, so that letting go never resets it to the default.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from phasesplit.operator import quantity
from phasesplit.operator.kube import Kube, object_path

FIELD_MANAGER = "phasesplit-operator"
SCALER_MANAGER = "phasesplit-autoscaler"  # the builtin autoscaler's writes and replicas handed over
APPLIED_HASH = "phasesplit.io/applied-hash"
REPLICAS = ("spec", "replicas")


def matches(desired: Any, live: Any) -> bool:
    """Whether live already holds desired (extra live fields are fine; empty equals absent)."""
    if isinstance(desired, dict):
        if not desired:
            return live in (None, {})
        return isinstance(live, dict) and all(matches(v, live.get(k)) for k, v in desired.items())
    if isinstance(desired, list):
        if not desired:
            return live in (None, [])
        return (isinstance(live, list) and len(live) == len(desired)
                and all(matches(d, item) for d, item in zip(desired, live)))
    return quantity.same(desired, live)


def stamped(desired: dict, without_replicas: bool) -> dict:
    """What is applied: `desired` (less `spec.replicas` when an autoscaler owns them) with its hash."""
    obj = copy.deepcopy(desired)
    if without_replicas:
        obj.get("spec", {}).pop("replicas", None)
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
    obj["metadata"].setdefault("annotations", {})[APPLIED_HASH] = digest
    return obj


def owns(live: dict, manager: str, field_path: tuple[str, ...]) -> bool:
    for entry in live.get("metadata", {}).get("managedFields") or []:
        if entry.get("manager") == manager and entry.get("operation") == "Apply":
            node = entry.get("fieldsV1") or {}
            for key in field_path:
                node = node.get(f"f:{key}") if isinstance(node, dict) else None
            if node is not None:
                return True
    return False


def apply(kube: Kube, desired: dict, replicas_elsewhere: bool = False) -> tuple[str, dict]:
    """Create, patch or leave one object; returns ("created" | "patched" | "unchanged", live object).

    `replicas_elsewhere`: an autoscaler owns `spec.replicas`; they are set from `desired` on creation only."""
    obj = stamped(desired, replicas_elsewhere)
    live = kube.get(object_path(obj))
    holding = live is not None and replicas_elsewhere and owns(live, FIELD_MANAGER, REPLICAS)
    if live is not None and matches(obj, live) and not holding:
        return "unchanged", live
    if holding:
        kube.apply(_replicas_only(live), SCALER_MANAGER)
    applied = kube.apply(obj, FIELD_MANAGER)
    initial = desired.get("spec", {}).get("replicas")
    if live is None and replicas_elsewhere and initial is not None and applied["spec"].get("replicas") != initial:
        applied = kube.apply(_replicas_only(applied, initial), SCALER_MANAGER)
    return ("created" if live is None else "patched"), applied


def _replicas_only(live: dict, replicas: int | None = None) -> dict:
    meta = live["metadata"]
    return {"apiVersion": live["apiVersion"], "kind": live["kind"],
            "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
            "spec": {"replicas": live["spec"].get("replicas", 1) if replicas is None else replicas}}
