import asyncio
import contextlib
import datetime
import itertools
import uuid

import kmock
import kopf
import pytest
import pytest_asyncio
import yaml

from routermetrics import FakeRouterMetrics

_versions = itertools.count(1)


@pytest_asyncio.fixture
async def router_metrics():
    fake = FakeRouterMetrics()
    fake.url = await fake.start()
    yield fake
    await fake.stop()


def server_metadata(name: str, namespace: str | None, **extra) -> dict:
    """What the API server would fill in (kmock does not)."""
    meta = {"name": name, "uid": str(uuid.uuid4()), "resourceVersion": str(next(_versions)),
            "creationTimestamp": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "generation": 1, **extra}
    if namespace:
        meta["namespace"] = namespace
    return meta


class Cluster(kmock.KubernetesEmulator):
    """kmock plus the server-side metadata kopf and the kubernetes client rely on, filled in on create
    (`generateName` too: kopf posts its Events with it)."""

    async def _handle(self, request):
        if request.resource is not None and request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:6]
            for key, value in server_metadata(meta.get("name", ""), None).items():
                meta.setdefault(key, value)
        return await super()._handle(request)


@pytest.fixture
def kube(kmock, tmp_path, monkeypatch):
    """kmock as the cluster: the resources the autoscaler touches, and a kubeconfig pointing at it."""
    kmock.resources["phasesplit.io/v1alpha1/splitinferences"] = kmock.ResourceInfo(
        kind="SplitInference", singular="splitinference", namespaced=True, subresources={"status"},
        verbs={"get", "list", "watch", "patch", "update", "create", "delete"})
    kmock.resources["apps/v1/deployments"] = kmock.ResourceInfo(
        kind="Deployment", singular="deployment", namespaced=True, subresources={"status", "scale"},
        verbs={"get", "list", "watch", "patch", "update", "create", "delete"})
    kmock.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", singular="namespace", namespaced=False,
                                                         verbs={"get", "list", "watch"})  # kopf waits for it
    kmock.resources["v1/pods"] = kmock.ResourceInfo(kind="Pod", singular="pod", namespaced=True,
                                                   verbs={"get", "list", "watch", "patch"})
    kmock.resources["v1/events"] = kmock.ResourceInfo(kind="Event", singular="event", namespaced=True,
                                                     verbs={"create", "list"})
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "users": [{"name": "kmock", "user": {"token": "test"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": "default"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    return kmock


@contextlib.asynccontextmanager
async def running_operator(server, *handlers):
    """kopf in this event loop, logged in to `server`, with only `handlers`: (function, decorator) pairs."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_):
        return kopf.ConnectionInfo(server=str(server).rstrip("/"), token="test")

    for fn, decorator in handlers:
        decorator(registry=registry)(fn)
    settings = kopf.OperatorSettings()
    settings.posting.level = 0
    settings.watching.server_timeout = 10
    stop = asyncio.Event()
    task = asyncio.create_task(kopf.operator(registry=registry, settings=settings, clusterwide=True,
                                             standalone=True, stop_flag=stop))
    try:
        yield
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=10)
