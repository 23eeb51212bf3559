"""A Kubernetes API emulator (kmock) for running the operator as a real process without a cluster.

kmock stores objects and streams watch events but fills in no server-side metadata. This adds
what kopf and the kubernetes client rely on: `uid`, `resourceVersion` (bumped on every write),
`creationTimestamp`, `generation` (bumped on spec changes), list `kind`/`apiVersion`, and CRDs
that register their resource when created. It runs in a background thread with its own loop, and
writes a kubeconfig pointing at 127.0.0.1 for the operator process.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import pathlib
import threading
import uuid

import jsonpatch
import kmock
import yaml
from kmock._internal import enums

# Resources the operator reads or writes, declared up front as kmock requires.
RESOURCES = {
    "v1/configmaps": dict(kind="ConfigMap", namespaced=True),
    "v1/services": dict(kind="Service", namespaced=True),
    "v1/secrets": dict(kind="Secret", namespaced=True),
    "v1/persistentvolumeclaims": dict(kind="PersistentVolumeClaim", namespaced=True),
    "v1/events": dict(kind="Event", namespaced=True),
    "v1/namespaces": dict(kind="Namespace", namespaced=False),
    "apps/v1/deployments": dict(kind="Deployment", namespaced=True, subresources={"status", "scale"}),
    "networking.k8s.io/v1/networkpolicies": dict(kind="NetworkPolicy", namespaced=True),
    "events.k8s.io/v1/events": dict(kind="Event", namespaced=True),
    "apiextensions.k8s.io/v1/customresourcedefinitions": dict(kind="CustomResourceDefinition", namespaced=False),
}
VERBS = {"list", "watch", "get", "create", "patch", "update", "delete"}


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator plus the server-side metadata kopf needs."""

    def _fill_create(self, request) -> None:
        meta = request.data.setdefault("metadata", {})
        if request.namespace:
            meta.setdefault("namespace", request.namespace)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = str(next(self.versions))
        meta["creationTimestamp"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta["generation"] = 1
        if request.data.get("kind") == "CustomResourceDefinition":
            register_crd(self, request.data)

    def _json_patch(self, request) -> None:
        """A failed `test` op is 422 on a real server (kopf tests resourceVersion); writes bump it."""
        key = (request.resource, request.namespace, request.name)
        current = self.objects[key].raw if key in self.objects and not self.objects[key].deleted else {}
        try:
            jsonpatch.apply_patch(current, [op for op in request.data if op.get("op") == "test"])
        except jsonpatch.JsonPatchTestFailed as e:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(e)) from None
        request.data.append({"op": "replace", "path": "/metadata/resourceVersion", "value": str(next(self.versions))})

    def _fill_update(self, request) -> None:
        if isinstance(request.data, list):
            return self._json_patch(request)
        if not isinstance(request.data, dict):
            return
        key = (request.resource, request.namespace, request.name)
        current = self.objects[key] if key in self.objects and not self.objects[key].deleted else None
        meta = request.data.get("metadata")
        if not isinstance(meta, dict):
            meta = request.data["metadata"] = {}
        meta["resourceVersion"] = str(next(self.versions))
        if current is not None and request.subresource is None and "spec" in request.data:
            old_spec = current.raw.get("spec")
            merged = _merged(old_spec, request.data["spec"])
            if merged != old_spec:
                meta["generation"] = int(current.raw.get("metadata", {}).get("generation", 1)) + 1

    async def _handle(self, request):
        if self.history is not None:  # kmock matches each request by scanning every request it kept
            del self._requests[:-self.history]
        if request.resource is not None and isinstance(request.data, (dict, list)):
            if request.action == enums.action.CREATE:
                self._fill_create(request)
            elif request.action == enums.action.UPDATE:
                self._fill_update(request)
        return await super()._handle(request)

    async def _serve_list(self, request):
        result = await super()._serve_list(request)
        info = self.resources[request.resource]
        result["kind"] = f"{info.kind}List" if info.kind else "List"
        result["apiVersion"] = request.resource.group and f"{request.resource.group}/{request.resource.version}" \
            or request.resource.version
        return result

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.versions = itertools.count(1000)
        self.history: int | None = None  # requests kept for assertions; None: all


def _merged(old, patch):
    if not isinstance(patch, dict) or not isinstance(old, dict):
        return patch
    out = dict(old)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merged(old.get(key), value)
    return out


def register_crd(emulator: kmock.KubernetesEmulator, crd: dict) -> None:
    spec = crd["spec"]
    for version in spec["versions"]:
        emulator.resources[f"{spec['group']}/{version['name']}/{spec['names']['plural']}"] = dict(
            kind=spec["names"]["kind"], singular=spec["names"].get("singular"),
            namespaced=spec["scope"] == "Namespaced", shortnames=set(spec["names"].get("shortNames", [])),
            verbs=VERBS, subresources=set(version.get("subresources", {})))


class EmulatorThread:
    """Runs the emulator on 127.0.0.1 in a daemon thread; `url` and `kubeconfig()` for clients."""

    def __init__(self, crds: list[dict] = (), history: int | None = None):
        self.crds = list(crds)
        self.history = history
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.emulator: Emulator | None = None
        self.url = ""
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)

    def __enter__(self) -> EmulatorThread:
        self._thread.start()
        if not self.started.wait(30):
            raise RuntimeError("the Kubernetes emulator did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with Emulator() as emulator, kmock.Server(emulator) as server:
            for resource, info in RESOURCES.items():
                emulator.resources[resource] = dict(verbs=VERBS, **info)
            for crd in self.crds:
                register_crd(emulator, crd)
            emulator.history = self.history
            self.emulator = emulator
            self.url = f"http://127.0.0.1:{server.port}"
            self.started.set()
            await self._stop.wait()

    def kubeconfig(self, path: pathlib.Path) -> pathlib.Path:
        config = {"apiVersion": "v1", "kind": "Config", "current-context": "emulator",
                  "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
                  "users": [{"name": "emulator", "user": {"token": "emulator"}}],
                  "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator",
                                                                "namespace": "default"}}]}
        path.write_text(yaml.safe_dump(config))
        return path
