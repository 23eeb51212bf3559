"""One reconciliation pass of a SplitInference: check the spec, apply the children, write status.

Plain functions over a `Kube` client, called by the kopf handlers; a pass that finds everything
as wanted sends no writes at all.
"""

from __future__ import annotations

import datetime
import logging
import secrets
from dataclasses import dataclass, field

import pydantic

from phasesplit.control import spec as si
from phasesplit.operator import builders, checks, status
from phasesplit.operator.apply import apply
from phasesplit.operator.prune import ROLLOUT_KINDS, prune
from phasesplit.operator.kube import Kube, KubeError, path
from phasesplit.validation import messages

log = logging.getLogger(__name__)


CONFLICT_RETRIES = 5  # status writes that lost a race with the other writer, read again


@dataclass(slots=True)
class Outcome:
    applied: dict[str, str] = field(default_factory=dict)  # "Kind/name" -> created | patched | unchanged
    pruned: list[str] = field(default_factory=list)  # "Kind/name" of owned children no longer wanted
    failures: list[str] = field(default_factory=list)  # "Kind/name: the server's message", one per child
    statuses: list[int] = field(default_factory=list)  # the HTTP status of each failure
    problems: list[str] = field(default_factory=list)
    status: dict = field(default_factory=dict)
    status_written: bool = False
    newly_invalid: bool = False
    newly_failed: bool = False  # failures differ from what status last said

    def failed(self, what: str, e: KubeError) -> None:
        self.failures.append(f"{what}: {e.message}")
        self.statuses.append(e.status)


def owner_of(body: dict, cluster_domain: str = builders.CLUSTER_DOMAIN) -> builders.Owner:
    meta = body["metadata"]
    return builders.Owner(name=meta["name"], namespace=meta.get("namespace") or "default", uid=meta.get("uid", ""),
                          cluster_domain=cluster_domain)


def parse(body: dict) -> tuple[si.SplitInferenceSpec | None, list[str]]:
    """The typed spec, or the problems that make it unusable (named by field)."""
    try:
        return si.SplitInferenceSpec.model_validate(body.get("spec") or {}), []
    except pydantic.ValidationError as e:
        return None, messages(e, si.SplitInferenceSpec, prefix="spec")


def desired_state(kube: Kube, body: dict, cluster_domain: str = builders.CLUSTER_DOMAIN
                  ) -> tuple[si.SplitInferenceSpec | None, list[dict], list[str]]:
    """The spec, its children and every problem found (schema, feasibility, the cluster)."""
    spec, problems = parse(body)
    if spec is None:
        return None, [], problems
    owner = owner_of(body, cluster_domain)
    problems = si.feasibility_problems(spec) + checks.cluster_problems(kube, owner, spec)
    try:
        children = builders.build_children(owner, spec)
    except ValueError as e:
        return spec, [], [*problems, str(e)]
    return spec, children, problems


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _deployments(kube: Kube, owner: builders.Owner, roles: list[str]) -> dict[str, dict | None]:
    names = {"router": builders.router_name(owner), **{r: builders.pool_name(owner, r) for r in roles}}
    return {role: kube.get(path("apps/v1", "Deployment", owner.namespace, name)) for role, name in names.items()}


def _roles(spec: si.SplitInferenceSpec | None, body: dict) -> list[str]:
    if spec is not None:
        return [role for role, _ in spec.pools.items()]
    pools = (body.get("spec") or {}).get("pools") or {}
    return [role for role in si.POOL_ROLES if pools.get(role)]


def write_status(kube: Kube, body: dict, spec: si.SplitInferenceSpec | None, problems: list[str],
                 outcome: Outcome, autoscaling: dict | None = None, failures: list[str] | None = None,
                 applied: dict | None = None, cluster_domain: str = builders.CLUSTER_DOMAIN) -> None:
    """The one writer of a SplitInference's status (the reconciler's and the autoscaler's parts),
    computed from the object as it is now and written only to that version of it (a conflict reads
    it again), so that neither part overwrites the other's last word. Nothing is written once the
    SplitInference is gone (a pass that raced its deletion).
    `applied`: the SplitInference as this pass applied it; its generation becomes `observedGeneration`
    (a status refresh between a spec change and its reconcile keeps the previous one)."""
    owner = owner_of(body, cluster_domain)
    for attempt in range(CONFLICT_RETRIES):
        body = kube.get(si_path(owner))
        if body is None:
            return
        previous = body.get("status") or {}
        new = _new_status(kube, owner, body, spec, problems, previous, autoscaling, failures, applied)
        outcome.status = new
        was = status.ready_condition(previous)
        outcome.newly_invalid = bool(problems) and (was.get("reason"), was.get("message")) != (
            "InvalidSpec", status.ready_condition(new)["message"])
        applied_was = status.find(previous, status.APPLIED_CONDITION)
        outcome.newly_failed = bool(failures) and applied_was.get("message") != status.find(
            new, status.APPLIED_CONDITION).get("message")
        if all(previous.get(key) == value for key, value in new.items()):
            return
        try:
            kube.patch(si_path(owner, "status"), {"metadata": {"resourceVersion": body["metadata"]["resourceVersion"]},
                                                  "status": new})
        except KubeError as e:
            if e.status == 404:
                return
            if e.status == 409 and attempt + 1 < CONFLICT_RETRIES:
                continue
            raise
        outcome.status_written = True
        return


def _new_status(kube: Kube, owner: builders.Owner, body: dict, spec: si.SplitInferenceSpec | None,
                problems: list[str], previous: dict, autoscaling: dict | None, failures: list[str] | None,
                applied: dict | None) -> dict:
    roles = _roles(spec, body)
    port = spec.router.service.port if spec else si.RouterService().port
    generation = int(applied["metadata"].get("generation") or 0) if applied else int(
        previous.get("observedGeneration") or 0)
    return status.build_status(roles, builders.endpoint(owner, port), _deployments(kube, owner, roles), problems,
                               previous, generation, _now(), autoscaling, failures)


def si_path(owner: builders.Owner, subresource: str | None = None) -> str:
    return path(f"{si.API_GROUP}/{si.API_VERSION}", si.KIND, owner.namespace, owner.name, subresource)


def reconcile(kube: Kube, body: dict, cluster_domain: str = builders.CLUSTER_DOMAIN,
              recheck_token: bool = False) -> Outcome:
    """Apply every child (unless the spec cannot work) and write the status. `recheck_token`: make the
    worker-token Secret again if it was deleted (the periodic resync asks; see `ensure_token_secret`)."""
    outcome = Outcome()
    spec, children, problems = desired_state(kube, body, cluster_domain)
    outcome.problems = problems
    if not problems:
        owner = owner_of(body)
        name = f"Secret/{builders.token_secret_name(owner)}"
        try:
            outcome.applied[name], revision = ensure_token_secret(kube, owner, recheck_token)
        except KubeError as e:
            outcome.failed(name, e)
            revision = known_token_revision(kube, owner)
        for child in builders.with_token_revision(children, revision):
            name = f"{child['kind']}/{child['metadata']['name']}"
            try:
                outcome.applied[name], _ = apply(kube, child, replicas_elsewhere=autoscaled(child, spec))
            except KubeError as e:  # one child refused (a missing CRD, a quota): the others still go
                outcome.failed(name, e)
        try:
            outcome.pruned = prune(kube, owner, children)
        except KubeError as e:
            outcome.failed("pruning", e)
    write_status(kube, body, spec, problems, outcome, failures=outcome.failures, applied=body,
                 cluster_domain=cluster_domain)
    return outcome


# (namespace, name, uid) -> the uid of the worker-token Secret as this process made or found it
_TOKEN_REVISIONS: dict[tuple[str, str, str], str | None] = {}


def ensure_token_secret(kube: Kube, owner: builders.Owner, recheck: bool = False) -> tuple[str, str | None]:
    """Creates the worker-token Secret with a fresh token unless it exists; returns what happened and the
    token's revision (the Secret's uid), which the pod templates carry so that a new token rolls them.

    The operator may only create Secrets: it never reads one, so it learns whether the Secret still exists
    by creating it again (a 409 writes nothing), on its first pass over a SplitInference and on each
    resync (`recheck`); a deleted Secret is made anew, with a new token, within a resync."""
    key = (owner.namespace, owner.name, owner.uid)
    if key in _TOKEN_REVISIONS and not recheck:
        return "unchanged", _TOKEN_REVISIONS[key]
    try:
        created = kube.create(builders.build_token_secret(owner, secrets.token_urlsafe(32)))
    except KubeError as e:
        if e.status != 409:
            raise
        _TOKEN_REVISIONS[key] = known_token_revision(kube, owner)
        return "unchanged", _TOKEN_REVISIONS[key]
    _TOKEN_REVISIONS[key] = created["metadata"].get("uid")
    return "created", _TOKEN_REVISIONS[key]


def known_token_revision(kube: Kube, owner: builders.Owner) -> str | None:
    """The token's revision as this process knows it, else as the router's pod template carries it."""
    key = (owner.namespace, owner.name, owner.uid)
    if key in _TOKEN_REVISIONS:
        return _TOKEN_REVISIONS[key]
    router = kube.get(path("apps/v1", "Deployment", owner.namespace, builders.router_name(owner))) or {}
    template = router.get("spec", {}).get("template", {}).get("metadata", {})
    return (template.get("annotations") or {}).get(builders.TOKEN_REVISION_ANNOTATION)


def refresh_status(kube: Kube, namespace: str, name: str, autoscaling: dict | None = None,
                   cluster_domain: str = builders.CLUSTER_DOMAIN) -> Outcome | None:
    """Recompute the status of one SplitInference after a child changed or the autoscaler acted
    (`autoscaling`: its new record); None if it is gone."""
    body = kube.get(si_path(builders.Owner(name, namespace, "")))
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    outcome = Outcome()
    spec, children, problems = desired_state(kube, body, cluster_domain)
    outcome.problems = problems
    if not problems:   # a pool whose rollout has ended lets go of its previous ConfigMap
        try:
            outcome.pruned = prune(kube, owner_of(body), children, kinds=ROLLOUT_KINDS)
        except KubeError as e:
            log.warning("pruning the ConfigMaps of %s/%s failed: %s", namespace, name, e.message)
    write_status(kube, body, spec, problems, outcome, autoscaling, cluster_domain=cluster_domain)
    return outcome


def autoscaled(child: dict, spec: si.SplitInferenceSpec) -> bool:
    """Whether an autoscaler owns this child's replicas (a pool Deployment outside mode none)."""
    role = child["metadata"]["labels"].get(builders.ROLE_LABEL)
    return child["kind"] == "Deployment" and role in si.POOL_ROLES and builders.autoscaler_owns_replicas(spec)
