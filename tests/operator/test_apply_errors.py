"""A child the API server refuses, with every handler of the operator against the emulator: what can
heal (a 5xx) is retried by kopf within seconds, not at the resync; what cannot (a 422) is reported
in status and Events and not retried."""

import kmock
import kopf
import pytest
import urllib3
from support.examples import split_inference
from support.kube_emulator import Emulator
from support.operator_harness import in_process_operator, server_metadata
from support.polling import eventually

from phasesplit.operator import errors, handlers
from phasesplit.operator.kube import KubeError

pytestmark = pytest.mark.kmock(cls=Emulator)

NS = "default"
SI = "phasesplit.io/v1alpha1/splitinferences"
CHILDREN = {"deployments": ["tiny-router", "tiny-prompt", "tiny-token"], "services": ["tiny", "tiny-prompt"]}
CONVERGED_WITHIN = 20.0  # seconds: kopf starting and retrying twice, well before the resync
assert CONVERGED_WITHIN <= handlers.RESYNC_SECONDS / 3


@pytest.fixture
def cluster(kmock):
    body = split_inference("tiny", NS, spec={"autoscaling": {"mode": "none"}})
    body["metadata"] = server_metadata("tiny", NS)
    kmock.objects[SI, NS, "tiny"] = body
    return kmock


@pytest.fixture
def operator(cluster, tmp_path, monkeypatch):
    """Every handler of the operator in this event loop (call it to start)."""
    return in_process_operator(cluster, tmp_path, monkeypatch)


def exists(cluster, plural: str, name: str) -> bool:
    key = (kmock.resource(("apps/v1/" if plural == "deployments" else "v1/") + plural), NS, name)
    return key in cluster.objects and not cluster.objects[key].deleted


def children_applied(cluster) -> dict:
    conditions = cluster.objects[SI, NS, "tiny"].raw.get("status", {}).get("conditions", [])
    return next((c for c in conditions if c["type"] == "ChildrenApplied"), {})


def handler_failures(caplog, how: str) -> list[str]:
    """What kopf logged of the reconcile handler failing `how` ("temporarily" or "permanently")."""
    return [r.getMessage() for r in caplog.records if f"Handler 'reconcile_fn' failed {how}" in r.getMessage()]


def events(cluster, text: str) -> list[dict]:
    return [o.raw for (resource, _, _), o in cluster.objects.items()
            if resource.plural == "events" and text in o.raw.get("message", "")]


async def test_a_transient_server_error_on_one_child_is_retried_within_seconds(cluster, operator, caplog):
    fault = cluster.refuse_writes("deployments", "tiny-token", 503, times=2,
                                  message="etcdserver: request timed out")
    async with operator():
        await eventually(lambda: children_applied(cluster).get("status") == "True"
                         and exists(cluster, "deployments", "tiny-token"),
                         timeout=CONVERGED_WITHIN, what="the refused Deployment applied by a kopf retry")
        await eventually(lambda: events(cluster, "Deployment/tiny-token: etcdserver: request timed out"),
                         what="an Event that says why")
    assert fault.hits == 2 and len(handler_failures(caplog, "temporarily")) == 2
    assert all(exists(cluster, plural, name) for plural, names in CHILDREN.items() for name in names)
    assert cluster.denied == [], "the chart's RBAC refused the operator"


async def test_a_refused_child_is_reported_and_not_retried(cluster, operator, caplog):
    invalid = 'Service "tiny-prompt" is invalid: spec.ports[0].appProtocol: Invalid value'
    fault = cluster.refuse_writes("services", "tiny-prompt", 422, message=invalid)
    async with operator():
        condition = await eventually(lambda: (c := children_applied(cluster)).get("status") == "False" and c,
                                     timeout=CONVERGED_WITHIN, what="ChildrenApplied=False")
        assert condition["reason"] == "ApplyFailed" and f"Service/tiny-prompt: {invalid}" in condition["message"]
        await eventually(lambda: [e for e in events(cluster, invalid) if e["type"] == "Warning"],
                         what="the ApplyFailed Warning")
        await eventually(lambda: handler_failures(caplog, "permanently"), what="kopf told of a permanent failure")
        with pytest.raises(TimeoutError):  # a temporary error would have been retried twice by now
            await eventually(lambda: fault.hits > 1, timeout=4 * errors.RETRY_DELAY)
    assert fault.hits == 1 and handler_failures(caplog, "temporarily") == []
    assert len(handler_failures(caplog, "permanently")) == 1 and invalid in handler_failures(caplog, "permanently")[0]
    assert len([e for e in events(cluster, invalid) if e["reason"] == "ApplyFailed"]) == 1
    assert all(exists(cluster, "deployments", name) for name in CHILDREN["deployments"]), "the others are applied"
    assert cluster.denied == []


@pytest.mark.parametrize("status, heals", [(409, True), (429, True), (500, True), (503, True), (504, True),
                                           (400, False), (403, False), (404, False), (422, False)])
def test_what_can_heal_is_retried_with_backoff_and_what_cannot_is_permanent(status, heals):
    error = errors.from_exception(KubeError(status, "PATCH", "/apis/apps/v1/x", "{}"), retry=3)
    if heals:
        assert isinstance(error, kopf.TemporaryError) and error.delay == 8 * errors.RETRY_DELAY
    else:
        assert isinstance(error, kopf.PermanentError)


def test_an_api_server_that_does_not_answer_is_retried_soon():
    error = errors.from_exception(urllib3.exceptions.MaxRetryError(None, "/api"), retry=0)
    assert isinstance(error, kopf.TemporaryError) and error.delay == errors.RETRY_DELAY


def test_a_pass_where_one_refusal_can_heal_is_retried():
    error = errors.from_failures(["Service/a: invalid", "Deployment/b: timed out"], [422, 503], retry=0)
    assert isinstance(error, kopf.TemporaryError) and "Deployment/b: timed out" in str(error)
