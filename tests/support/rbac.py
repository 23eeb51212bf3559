"""The RBAC rules the chart grants the operator's ServiceAccount, read from `helm template` output,
and the authorizer an API server would run over them."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass

import yaml

from support.examples import ROOT

CHART = ROOT / "charts" / "phasesplit"
RELEASE, NAMESPACE = "phasesplit", "phasesplit-system"


def helm_binary() -> str:
    for candidate in (os.environ.get("HELM"), str(ROOT / ".venv" / "bin" / "helm"), shutil.which("helm")):
        if candidate and os.path.exists(candidate):
            return candidate
    subprocess.run(["sh", str(ROOT / "hack" / "install-helm.sh")], cwd=ROOT, check=True)
    return str(ROOT / ".venv" / "bin" / "helm")


def render_chart(*sets: str) -> list[dict]:
    args = [helm_binary(), "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@dataclass(frozen=True)
class Grant:
    rule: dict
    namespace: str | None  # None: cluster-wide (a ClusterRoleBinding)


class Authorizer:
    """Allows a request when a rule bound to the ServiceAccount covers its verb, group, resource
    (with subresource), namespace and name, as the API server's RBAC authorizer does."""

    def __init__(self, docs: list[dict], service_account: str, namespace: str):
        roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d.get("rules") or []
                 for d in docs if d.get("kind") in ("ClusterRole", "Role")}
        self.grants: list[Grant] = []
        for binding in (d for d in docs if d.get("kind") in ("ClusterRoleBinding", "RoleBinding")):
            subjects = binding.get("subjects") or []
            if not any(s.get("kind") == "ServiceAccount" and s.get("name") == service_account
                       and s.get("namespace") == namespace for s in subjects):
                continue
            where = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
            ref = binding["roleRef"]
            role_ns = None if ref["kind"] == "ClusterRole" else where
            self.grants += [Grant(rule, where) for rule in roles.get((ref["kind"], role_ns, ref["name"]), [])]

    def allows(self, verb: str, group: str, resource: str, namespace: str | None, name: str | None = None) -> bool:
        return any(_covers(g.rule, verb, group, resource, name) and (g.namespace is None or g.namespace == namespace)
                   for g in self.grants)


def _covers(rule: dict, verb: str, group: str, resource: str, name: str | None) -> bool:
    def has(values, wanted):
        return "*" in (values or []) or wanted in (values or [])
    if not (has(rule.get("verbs"), verb) and has(rule.get("apiGroups"), group) and has(rule.get("resources"), resource)):
        return False
    names = rule.get("resourceNames")
    return not names or (name is not None and name in names)


@functools.cache
def chart_authorizer(*sets: str) -> Authorizer:
    """The operator's permissions as the chart (with `sets`) grants them."""
    docs = render_chart(*sets)
    account = next(d for d in docs if d["kind"] == "ServiceAccount")
    return Authorizer(docs, account["metadata"]["name"], account["metadata"].get("namespace") or NAMESPACE)
