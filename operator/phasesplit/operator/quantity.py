"""Kubernetes resource quantities by value: "1", 1, "1000m" and "0.001k" are the same amount, as the
API server (which rewrites each into its canonical form) sees them."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_PATTERN = re.compile(r"^([+-]?[0-9.]+(?:[eE][-+]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")
SUFFIXES = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1), "k": Decimal("1e3"),
            "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"), "P": Decimal("1e15"),
            "E": Decimal("1e18"), **{s: Decimal(1024) ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))}}


def value(q: object) -> Decimal | None:
    """The amount a quantity stands for; None when `q` is not a quantity."""
    if isinstance(q, bool) or not isinstance(q, (int, float, str)):
        return None
    match = _PATTERN.match(str(q).strip())
    if not match:
        return None
    try:
        return Decimal(match.group(1)) * SUFFIXES[match.group(2) or ""]
    except InvalidOperation:
        return None


def same(desired: object, live: object) -> bool:
    """Equal, or the same quantity written two ways (the server returns quantities rewritten)."""
    if desired == live:
        return True
    a, b = value(desired), value(live)
    return a is not None and a == b
