"""Idempotent apply: create a child, or merge-patch only what differs from what we want.

Like `kubectl apply`, the last applied object is kept in an annotation, so a field removed from
the desired object is removed from the live one; fields the server or others fill in stay alone.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from phasesplit.operator.kube import Kube, KubeError, object_path

LAST_APPLIED = "phasesplit.io/last-applied"


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
    return desired == live


def merge_patch(desired: dict, live: dict, last: dict) -> dict:
    """A JSON merge patch taking live to desired, deleting keys that were applied last time only."""
    patch: dict = {}
    for key, want in desired.items():
        have = live.get(key)
        if isinstance(want, dict) and want and isinstance(have, dict):
            previous = last.get(key) if isinstance(last.get(key), dict) else {}
            if sub := merge_patch(want, have, previous):
                patch[key] = sub
        elif not matches(want, have):
            patch[key] = want
    for key in last:
        if key not in desired and live.get(key) is not None:
            patch[key] = None
    return patch


def _without(obj: dict, dropped: tuple[tuple[str, ...], ...]) -> dict:
    obj = copy.deepcopy(obj)
    for field_path in dropped:
        node = obj
        for key in field_path[:-1]:
            node = node.get(key, {})
        node.pop(field_path[-1], None)
    return obj


def _record(obj: dict, recorded: dict) -> dict:
    """obj with the last-applied annotation holding `recorded`."""
    obj = copy.deepcopy(obj)
    annotations = obj["metadata"].setdefault("annotations", {})
    annotations[LAST_APPLIED] = json.dumps(recorded, sort_keys=True, separators=(",", ":"))
    return obj


def apply(kube: Kube, desired: dict, unowned: tuple[tuple[str, ...], ...] = ()) -> tuple[str, dict]:
    """Create or patch one object; returns ("created" | "patched" | "unchanged", live object).

    `unowned` field paths (e.g. ("spec", "replicas") when an autoscaler owns them) are set on
    creation only and never patched or recorded afterwards.
    """
    owned = _without(desired, unowned)
    resource_path = object_path(desired)
    live = kube.get(resource_path)
    if live is None:
        try:
            return "created", kube.create(_record(desired, owned))
        except KubeError as e:
            if e.status != 409:
                raise
            live = kube.get(resource_path)  # created meanwhile by another pass: patch it instead
            if live is None:
                raise
    annotations = live.get("metadata", {}).get("annotations") or {}
    last = json.loads(annotations.get(LAST_APPLIED, "{}"))
    patch = merge_patch(_record(owned, owned), live, last)
    if not patch:
        return "unchanged", live
    return "patched", kube.patch(resource_path, patch)
