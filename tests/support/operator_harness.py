"""The operator against the Kubernetes emulator (support.kube_emulator), two ways: as a real
`phasesplit operator` process, or as kopf in the test's event loop with every handler the
process registers (`running_operator`)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import os
import pathlib
import signal
import subprocess
import sys
import uuid

import kopf
import kubernetes
from support.kube_emulator import OPERATOR_TOKEN

from phasesplit.operator import handlers
from phasesplit.operator.kube import Kube

_versions = itertools.count(1)


def kube_client(url: str, token: str = "admin") -> Kube:
    """A client for the test itself (the admin token: not held to the operator's RBAC)."""
    config = kubernetes.client.Configuration()
    config.host = url
    config.api_key = {"authorization": f"Bearer {token}"}
    return Kube(kubernetes.client.ApiClient(config))


def start_operator(kubeconfig: pathlib.Path, log: pathlib.Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "phasesplit.cli", "operator", "-A", "--standalone",
                                 "--verbose", *extra], env=env, stdout=out, stderr=subprocess.STDOUT)


def stop_operator(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


@contextlib.asynccontextmanager
async def running_operator(server: str, token: str, tick_seconds: float = 0.3, namespaces: tuple[str, ...] = ()):
    """kopf in this event loop with the operator's handlers, logged in to `server` with `token`,
    watching `namespaces` (none: every namespace); the handlers' own client reads $KUBECONFIG (the
    caller points it at the same server)."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_):
        return kopf.ConnectionInfo(server=str(server).rstrip("/"), token=token)

    handlers.register(registry, tick_seconds=tick_seconds)
    settings = kopf.OperatorSettings()
    settings.watching.server_timeout = 10
    # kmock cannot serve the list of namespaces that kopf tries before it watches given ones; refused it
    # (the chart does not grant it), kopf takes the names it was given, as it does here.
    settings.scanning.disabled = bool(namespaces)
    stop = asyncio.Event()
    task = asyncio.create_task(kopf.operator(registry=registry, settings=settings, clusterwide=not namespaces,
                                             namespaces=list(namespaces), standalone=True, stop_flag=stop))
    try:
        yield
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=10)


def in_process_operator(emulator, tmp_path: pathlib.Path, monkeypatch, namespaces: tuple[str, ...] = ()):
    """What starts `running_operator` against a kmock `emulator` with the operator's token (call it);
    the handlers' own client reads a kubeconfig written for the same server, as in a process."""
    kubeconfig = tmp_path / "kubeconfig"
    emulator.kubeconfig(kubeconfig)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    return lambda: running_operator(emulator.url, OPERATOR_TOKEN, namespaces=namespaces)


def server_metadata(name: str, namespace: str | None, **extra) -> dict:
    """What the API server fills in on create, for objects put straight into the emulator."""
    meta = {"name": name, "uid": str(uuid.uuid4()), "resourceVersion": str(next(_versions)),
            "creationTimestamp": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "generation": 1, **extra}
    if namespace:
        meta["namespace"] = namespace
    return meta
