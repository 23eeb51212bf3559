"""kopf in the test's event loop against the project's kmock emulator (support.kube_emulator)."""

import asyncio
import contextlib
import datetime
import itertools
import uuid

import kmock
import kopf

from support.kube_emulator import RESOURCES, VERBS, Emulator, register_crd  # noqa: F401  (Emulator re-exported)

from phasesplit.operator.crd import build_crd

_versions = itertools.count(1)


def declare(cluster: kmock.KubernetesEmulator) -> None:
    for resource, info in RESOURCES.items():
        cluster.resources[resource] = dict(verbs=VERBS, **info)
    cluster.resources["v1/pods"] = dict(kind="Pod", namespaced=True, verbs=VERBS)
    register_crd(cluster, build_crd())


def server_metadata(name: str, namespace: str | None, **extra) -> dict:
    """What the API server fills in on create, for objects put straight into the emulator."""
    meta = {"name": name, "uid": str(uuid.uuid4()), "resourceVersion": str(next(_versions)),
            "creationTimestamp": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "generation": 1, **extra}
    if namespace:
        meta["namespace"] = namespace
    return meta


@contextlib.asynccontextmanager
async def running_operator(server, *handlers, startup=None):
    """kopf in this event loop, logged in to `server`, with only `handlers`: (function, decorator) pairs."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_):
        return kopf.ConnectionInfo(server=str(server).rstrip("/"), token="test")

    if startup is not None:
        kopf.on.startup(registry=registry)(startup)
    for fn, decorator in handlers:
        decorator(registry=registry)(fn)
    settings = kopf.OperatorSettings()
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
