"""A Kubernetes API emulator (kmock) that behaves like an API server where the operator relies on it.

kmock stores objects and streams watch events, and nothing else. This adds what kopf, the
kubernetes client and the operator meet on a real cluster:
- server-side metadata: `uid`, `resourceVersion` (bumped on every write), `creationTimestamp`,
  `generation` (bumped on spec changes); list `kind`/`apiVersion`; CRDs register their resource;
- RBAC: a request made with the operator's token (`OPERATOR_TOKEN`) is checked against the rules
  the chart binds to the operator's ServiceAccount (`helm template` with `chart_sets`: by default
  the cluster-wide install the tests' operator runs as), and answered 403 when none
  allows it; setting `blockOwnerDeletion` needs `update` on the owner's `finalizers`. Every denial
  is kept in `denied`. The tests' own token (`ADMIN_TOKEN`) may do anything;
- admission: the operator's merge patches of existing objects pass the chart's
  ValidatingAdmissionPolicies (its pod patches may set only the pod-deletion-cost), else 422;
- defaults and validation: a Deployment's missing or null `replicas` becomes 1; resource
  quantities are rewritten in canonical form (`1` -> "1", `0.5` -> "500m"); names are checked
  (a Service name is an RFC 1035 label, others DNS-1123 subdomains), 422 otherwise;
- server-side apply (`application/apply-patch+yaml`): per-manager field ownership in
  `metadata.managedFields`, fields a manager stops applying are removed unless another owns
  them, conflicts (409) unless forced; a merge patch moves the fields it changes to its manager;
- garbage collection: once an object is gone, the objects it owns are deleted;
- an immutable ConfigMap's data cannot change (422);
- a merge patch that names a `resourceVersion` other than the live one is 409 (optimistic
  concurrency);
- a kind that is not declared (a CRD not installed, such as KEDA's) is 404.
On demand it is slow to create (`create_delay`), so that a client can be stopped between creates,
and refuses one object's writes with a given status (`refuse_writes`: a webhook not ready, an
overloaded server, a validation it does not model) a given number of times.
It runs in a background thread with its own loop (`EmulatorThread`), or as kmock's pytest fixture
(`pytest.mark.kmock(cls=Emulator)`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import itertools
import pathlib
import re
import threading
import uuid

import aiohttp.web
import jsonpatch
import kmock
import yaml
from kmock._internal import enums

from phasesplit.operator import quantity
from phasesplit.operator.crd import build_crd
from support.admission import OPERATOR_USER, chart_policies
from support.rbac import chart_authorizer

OPERATOR_TOKEN, ADMIN_TOKEN = "operator", "admin"
CLUSTER_WIDE = ("rbac.clusterWide=true",)  # the chart's values for an operator that watches every namespace
APPLY = "application/apply-patch+yaml"
# Resources the operator reads or writes, declared up front as kmock requires.
RESOURCES = {
    "v1/configmaps": dict(kind="ConfigMap", namespaced=True),
    "v1/services": dict(kind="Service", namespaced=True),
    "v1/secrets": dict(kind="Secret", namespaced=True),
    "v1/persistentvolumeclaims": dict(kind="PersistentVolumeClaim", namespaced=True),
    "v1/events": dict(kind="Event", namespaced=True),
    "v1/namespaces": dict(kind="Namespace", namespaced=False),
    "v1/pods": dict(kind="Pod", namespaced=True),
    "apps/v1/deployments": dict(kind="Deployment", namespaced=True, subresources={"status", "scale"}),
    "networking.k8s.io/v1/networkpolicies": dict(kind="NetworkPolicy", namespaced=True),
    "policy/v1/poddisruptionbudgets": dict(kind="PodDisruptionBudget", namespaced=True),
    "autoscaling/v2/horizontalpodautoscalers": dict(kind="HorizontalPodAutoscaler", namespaced=True),
    "events.k8s.io/v1/events": dict(kind="Event", namespaced=True),
    "apiextensions.k8s.io/v1/customresourcedefinitions": dict(kind="CustomResourceDefinition", namespaced=False),
}
WRITES = {"POST", "PUT", "PATCH", "DELETE"}
VERBS = {"list", "watch", "get", "create", "patch", "update", "delete"}
ACTION_VERBS = {enums.action.LIST: "list", enums.action.WATCH: "watch", enums.action.FETCH: "get",
                enums.action.CREATE: "create", enums.action.UPDATE: "patch", enums.action.DELETE: "delete"}
QUANTITY_KINDS = {"Deployment", "Pod", "HorizontalPodAutoscaler"}  # custom resources keep what was written
REASONS = {400: "BadRequest", 403: "Forbidden", 409: "Conflict", 422: "Invalid", 429: "TooManyRequests",
           500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout"}
RFC1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclasses.dataclass
class Fault:
    """Writes of one object answered `status`: the next `times` of them (None: every one)."""
    status: int
    message: str
    times: int | None
    hits: int = 0  # writes refused so far

    def fires(self) -> bool:
        """Counts one write; whether it is refused."""
        if self.times is not None:
            if self.times == 0:
                return False
            self.times -= 1
        self.hits += 1
        return True


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator plus the API-server behaviour listed in the module's docstring."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.versions = itertools.count(1000)
        self.history: int | None = None  # requests kept for assertions; None: all
        self.authorizer = chart_authorizer(*CLUSTER_WIDE)
        self.policies = chart_policies(*CLUSTER_WIDE)
        self.denied: list[str] = []
        self.create_delay = 0.0  # seconds each create waits before it is stored (a slow API server)
        self.faults: dict[tuple[str, str], Fault] = {}  # (plural, name) -> how its writes are refused
        for resource, info in RESOURCES.items():
            self.resources[resource] = dict(verbs=VERBS, **info)
        register_crd(self, build_crd())

    def kubeconfig(self, path: pathlib.Path, token: str = OPERATOR_TOKEN) -> pathlib.Path:
        return write_kubeconfig(path, str(self.url).rstrip("/"), token)

    def refuse_writes(self, plural: str, name: str, status: int, times: int | None = None,
                      message: str = "") -> Fault:
        """Answers the next `times` writes (None: every write) of the object `plural`/`name` with
        `status`, after authorization as a webhook or a validation would; returns the fault, whose
        `hits` counts the writes refused."""
        message = message or f"the server refused {plural}/{name} (HTTP {status})"
        fault = self.faults[plural, name] = Fault(status, message, times)
        return fault

    # ---- the request path ----

    async def _handle(self, request):
        if self.history is not None:  # kmock matches each request by scanning every request it kept
            del self._requests[:-self.history]
        if request.resource is None or request.resource.plural is None:  # discovery: open to all
            return await super()._handle(request)
        try:
            if request.resource not in self.resources:  # a kind whose CRD is not installed (KEDA's)
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            self._authorize(request)
            self._admit(request)
            self._refuse(request)
            if self.create_delay and self._creates(request):
                await asyncio.sleep(self.create_delay)
            if request.method == "PATCH" and _content_type(request) == APPLY:
                await self._server_side_apply(request)
            elif isinstance(request.data, (dict, list)):
                if request.action == enums.action.CREATE:
                    self._fill_create(request)
                elif request.action == enums.action.UPDATE:
                    self._fill_update(request)
        except ApiError as e:
            return e.response()
        response = await super()._handle(request)
        if request.action == enums.action.CREATE or (
                request.action in (enums.action.DELETE, enums.action.UPDATE) and self._live(request) is None):
            await self._collect_garbage()  # also an object created for an owner that is already gone
        return response

    def _authorize(self, request) -> None:
        token = _bearer(request)
        if token == ADMIN_TOKEN:
            return
        verb = ACTION_VERBS.get(request.action) or {"PUT": "update"}.get(str(request.method), "get")
        group, plural = request.resource.group or "", request.resource.plural
        resource = f"{plural}/{request.subresource}" if request.subresource else plural
        name = _name(request)
        needed = [(verb, group, resource, name)]
        if verb == "patch" and _content_type(request) == APPLY and self._live(request) is None:
            needed.append(("create", group, resource, name))  # apply that creates needs create too
        for owner in _blocking_owners(request.data):
            owner_group = owner["apiVersion"].rpartition("/")[0]
            needed.append(("update", owner_group, f"{owner['kind'].lower()}s/finalizers", owner["name"]))
        for verb, group, resource, name in needed:
            if token != OPERATOR_TOKEN or not self.authorizer.allows(verb, group, resource, request.namespace, name):
                where = f" in namespace {request.namespace!r}" if request.namespace else " at the cluster scope"
                message = (f'{resource}{"." + group if group else ""} {name or ""} is forbidden: the operator '
                           f'cannot {verb} resource "{resource}" in API group "{group}"{where}')
                self.denied.append(message)
                raise ApiError(403, "Forbidden", message)

    def _admit(self, request) -> None:
        """The chart's admission policies, on the operator's merge patches of existing objects."""
        if _bearer(request) != OPERATOR_TOKEN or request.action != enums.action.UPDATE or request.subresource \
                or not isinstance(request.data, dict) or _content_type(request) == APPLY:
            return
        live = self._live(request)
        if live is None:
            return
        after = _merged(live, request.data)
        for policy in self.policies:
            if policy.matches(request.resource.group or "", request.resource.plural, "UPDATE") and \
                    (refused := policy.refusals(live, after, OPERATOR_USER)):
                message = (f'{live.get("kind")} "{request.name}" is forbidden: ValidatingAdmissionPolicy '
                           f'{policy.name!r} denied request: {"; ".join(refused)}')
                self.denied.append(message)
                raise ApiError(422, "Invalid", message)

    def _refuse(self, request) -> None:
        fault = self.faults.get((request.resource.plural, _name(request)))
        if fault is not None and request.method in WRITES and fault.fires():
            raise ApiError(fault.status, REASONS.get(fault.status, "InternalError"), fault.message)

    def _creates(self, request) -> bool:
        applies = request.method == "PATCH" and _content_type(request) == APPLY
        return request.action == enums.action.CREATE or (applies and self._live(request) is None)

    def _live(self, request) -> dict | None:
        key = (request.resource, request.namespace, request.name)
        obj = self.objects[key] if key in self.objects else None
        return None if obj is None or obj.deleted else obj.raw

    def _fill_create(self, request) -> None:
        meta = request.data.setdefault("metadata", {})
        if request.namespace:
            meta.setdefault("namespace", request.namespace)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        _validate_name(request.data)
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = str(next(self.versions))
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        _default(request.data)
        if request.data.get("kind") in QUANTITY_KINDS:
            _normalise(request.data)
        if request.data.get("kind") == "CustomResourceDefinition":
            register_crd(self, request.data)

    def _json_patch(self, request) -> None:
        """A failed `test` op is 422 on a real server (kopf tests resourceVersion); writes bump it."""
        current = self._live(request) or {}
        try:
            jsonpatch.apply_patch(current, [op for op in request.data if op.get("op") == "test"])
        except jsonpatch.JsonPatchTestFailed as e:
            raise ApiError(422, "Invalid", str(e)) from None
        request.data.append({"op": "replace", "path": "/metadata/resourceVersion", "value": str(next(self.versions))})

    def _fill_update(self, request) -> None:
        if isinstance(request.data, list):
            return self._json_patch(request)
        current = self._live(request)
        meta = request.data.get("metadata")
        if not isinstance(meta, dict):
            meta = request.data["metadata"] = {}
        expected = meta.get("resourceVersion")  # a patch that names a version applies to that one only
        if current is not None and expected and expected != current["metadata"].get("resourceVersion"):
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {current["kind"]} '
                                            f'"{request.name}": the object has been modified')
        meta["resourceVersion"] = str(next(self.versions))
        if current is None:
            return
        after = _merged(current, request.data)
        if request.subresource is None and after.get("spec") != current.get("spec"):
            meta["generation"] = int(current.get("metadata", {}).get("generation", 1)) + 1
        if request.subresource in (None, "scale"):
            _default(after)
            if (after.get("spec") or {}).get("replicas") != (current.get("spec") or {}).get("replicas") \
                    and after.get("kind") == "Deployment":
                request.data.setdefault("spec", {})["replicas"] = after["spec"]["replicas"]
            changed = _leaves(after) ^ _leaves(current) | {p for p in _leaves(after) & _leaves(current)
                                                           if _at(after, p) != _at(current, p)}
            manager = request.params.get("fieldManager") or "unknown"
            meta["managedFields"] = _take(current, manager, "Update", changed, _leaves(after))
        if after.get("kind") in QUANTITY_KINDS:
            _normalise(request.data)

    async def _server_side_apply(self, request) -> None:
        manager = request.params.get("fieldManager")
        if not manager:
            raise ApiError(400, "BadRequest", "PATCH with application/apply-patch+yaml requires fieldManager")
        config = request.data if isinstance(request.data, dict) else yaml.safe_load(request.text)
        config.setdefault("metadata", {})["name"] = request.name
        if request.namespace:
            config["metadata"]["namespace"] = request.namespace
        live = self._live(request)
        fields = _leaves(config) - _IDENTITY
        if live is None:
            _validate_name(config)
            obj = {**config, "metadata": {**config["metadata"], "uid": str(uuid.uuid4()),
                                          "resourceVersion": str(next(self.versions)), "creationTimestamp": _now(),
                                          "generation": 1}}
            _default(obj)
            if obj.get("kind") in QUANTITY_KINDS:
                _normalise(obj)
            obj["metadata"]["managedFields"] = [_entry(manager, "Apply", fields)]
            object.__setattr__(request, "action", enums.action.CREATE)
            object.__setattr__(request, "data", obj)
            if obj.get("kind") == "CustomResourceDefinition":
                register_crd(self, obj)
            return
        if live.get("immutable") and config.get("data") != live.get("data"):
            raise ApiError(422, "Invalid", f'{live["kind"]} "{request.name}" is invalid: data: Forbidden: '
                                           "field is immutable when `immutable` is set")
        if config.get("kind") in QUANTITY_KINDS:
            _normalise(config)
        owners = _owners(live)
        conflicts = sorted(".".join(p) for p in fields for m, owned in owners.items()
                           if m != manager and p in owned and _at(live, p) != _at(config, p))
        if conflicts and request.params.get("force") != "true":
            raise ApiError(409, "Conflict", f"Apply failed with {len(conflicts)} conflicts: {', '.join(conflicts)}")
        dropped = {p for p in owners.get(manager, set()) - fields
                   if not any(p in owned for m, owned in owners.items() if m != manager)}
        after = _merged(live, config)
        for p in sorted(dropped, key=len, reverse=True):
            _remove(after, p)
        _default(after)
        after["metadata"]["managedFields"] = _take(live, manager, "Apply", fields, _leaves(after), replace=True)
        after["metadata"]["resourceVersion"] = str(next(self.versions))
        if after.get("spec") != live.get("spec"):
            after["metadata"]["generation"] = int(live["metadata"].get("generation", 1)) + 1
        object.__setattr__(request, "data", _diff(live, after))

    async def _serve_list(self, request):
        result = await super()._serve_list(request)
        info = self.resources[request.resource]
        result["kind"] = f"{info.kind}List" if info.kind else "List"
        result["apiVersion"] = request.resource.group and f"{request.resource.group}/{request.resource.version}" \
            or request.resource.version
        result["metadata"]["resourceVersion"] = str(next(self.versions))
        result["items"] = [o for o in result["items"] if _selected(o, request)]
        return result

    async def _serve_watch(self, request):
        """Only what happened after the list the watch continues (a real server's resourceVersion)."""
        since = request.params.get("resourceVersion", "")
        async for event in super()._serve_watch(request):
            if (since.isdigit() and isinstance(event, dict) and event.get("type") == "ADDED"
                    and int(event["object"]["metadata"].get("resourceVersion", "0")) <= int(since)):
                continue
            if isinstance(event, dict) and isinstance(event.get("object"), dict) and not _selected(event["object"], request):
                continue
            yield event

    async def _collect_garbage(self) -> None:
        """Deletes, in the background, every object whose owners are all gone (what kube-controller-manager does)."""
        while True:
            alive = {o.raw["metadata"].get("uid") for o in self.objects.values() if not o.deleted}
            orphans = [(key, o) for key, o in self.objects.items() if not o.deleted
                       and (refs := o.raw["metadata"].get("ownerReferences"))
                       and not any(r.get("uid") in alive for r in refs)]
            if not orphans:
                return
            async with self._lock:
                for (resource, _, _), obj in orphans:
                    raw = obj.raw
                    obj.delete()
                    await self._buses[resource].put({"type": "DELETED", "object": raw})


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message

    def response(self) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                                          "code": self.status, "reason": self.reason, "message": self.message},
                                         status=self.status)


# ---- API-server rules, as pure functions ----

_IDENTITY = {("apiVersion",), ("kind",), ("metadata", "name"), ("metadata", "namespace")}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _bearer(request) -> str:
    auth = next((v for k, v in request.headers.items() if k.lower() == "authorization"), "")
    return auth.removeprefix("Bearer ").strip()


def _name(request) -> str | None:
    """The object a request is about: in its path, or in the body of a create."""
    return request.name or ((request.data or {}).get("metadata", {}).get("name")
                            if isinstance(request.data, dict) else None)


def _content_type(request) -> str:
    return next((v for k, v in request.headers.items() if k.lower() == "content-type"), "").split(";")[0]


def _blocking_owners(data) -> list[dict]:
    if not isinstance(data, dict):
        return []
    return [r for r in (data.get("metadata") or {}).get("ownerReferences") or [] if r.get("blockOwnerDeletion")]


def _validate_name(obj: dict) -> None:
    name, kind = obj.get("metadata", {}).get("name") or "", obj.get("kind")
    rule, what = (RFC1035, "a DNS-1035 label") if kind == "Service" else (DNS1123_SUBDOMAIN, "a DNS-1123 subdomain")
    limit = 63 if kind == "Service" else 253
    if not rule.match(name) or len(name) > limit:
        raise ApiError(422, "Invalid", f'{kind} "{name}" is invalid: metadata.name: Invalid value: "{name}": '
                                       f"must be {what} (at most {limit} characters)")


def _default(obj: dict) -> None:
    if obj.get("kind") == "Deployment":
        spec = obj.setdefault("spec", {})
        if spec.get("replicas") is None:
            spec["replicas"] = 1


def canonical(q) -> str:
    """A quantity as the API server writes it back: "1", "500m", "1Gi", "1k"."""
    amount = quantity.value(q)
    if amount is None:
        return q
    if str(q).endswith("i") and amount == amount.to_integral():
        for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
            if (amount / quantity.SUFFIXES[suffix]) == (amount / quantity.SUFFIXES[suffix]).to_integral():
                return f"{int(amount / quantity.SUFFIXES[suffix])}{suffix}"
    for suffix in ("E", "P", "T", "G", "M", "k", "", "m", "u", "n"):
        scaled = amount / quantity.SUFFIXES[suffix]
        if scaled == scaled.to_integral():
            return f"{int(scaled)}{suffix}"
    return str(q)


def _normalise(node, key: str = "") -> None:
    """Quantities in resources, emptyDir size limits and HPA targets, rewritten as the server does."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("requests", "limits") and isinstance(v, dict):
                node[k] = {name: canonical(amount) for name, amount in v.items()}
            elif k in ("sizeLimit", "averageValue", "value") and key in ("emptyDir", "target"):
                node[k] = canonical(v)
            else:
                _normalise(v, k)
    elif isinstance(node, list):
        for item in node:
            _normalise(item, key)


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


def _diff(old: dict, new: dict) -> dict:
    """The merge patch that takes old to new."""
    patch = {k: None for k in old if k not in new}
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(old.get(k), dict):
            if sub := _diff(old[k], v):
                patch[k] = sub
        elif old.get(k) != v or k not in old:
            patch[k] = v
    return patch


def _leaves(obj, prefix: tuple = ()) -> set[tuple]:
    """Field paths of an object's values (lists count as one value); metadata the server owns left out."""
    if isinstance(obj, dict) and obj:
        out = set()
        for k, v in obj.items():
            if prefix == ("metadata",) and k in ("managedFields", "uid", "resourceVersion", "generation",
                                                 "creationTimestamp", "deletionTimestamp"):
                continue
            if not prefix and k == "status":
                continue
            out |= _leaves(v, (*prefix, k))
        return out
    return {prefix} if prefix else set()


def _at(obj, path: tuple):
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _remove(obj: dict, path: tuple) -> None:
    parents = [obj]
    for key in path[:-1]:
        obj = obj.get(key) if isinstance(obj, dict) else None
        if obj is None:
            return
        parents.append(obj)
    obj.pop(path[-1], None)
    for parent, key in zip(reversed(parents[:-1]), reversed(path[:-1])):  # drop maps left empty
        if parent.get(key) == {}:
            parent.pop(key)


def _fields_v1(paths: set[tuple]) -> dict:
    tree: dict = {}
    for path in paths:
        node = tree
        for key in path:
            node = node.setdefault(f"f:{key}", {})
    return tree


def _paths(tree: dict, prefix: tuple = ()) -> set[tuple]:
    if not tree:
        return {prefix} if prefix else set()
    return set().union(*(_paths(v, (*prefix, k.removeprefix("f:"))) for k, v in tree.items()))


def _entry(manager: str, operation: str, paths: set[tuple]) -> dict:
    return {"manager": manager, "operation": operation, "apiVersion": "v1", "time": _now(),
            "fieldsType": "FieldsV1", "fieldsV1": _fields_v1(paths)}


def _owners(obj: dict) -> dict[str, set[tuple]]:
    return {e["manager"]: _paths(e.get("fieldsV1") or {}) for e in obj["metadata"].get("managedFields") or []}


def _take(live: dict, manager: str, operation: str, paths: set[tuple], present: set[tuple],
          replace: bool = False) -> list[dict]:
    """managedFields after `manager` took `paths` (an apply replaces its set; an update adds to it)."""
    owners = _owners(live)
    mine = paths if replace else owners.get(manager, set()) | paths
    entries = []
    for entry in live["metadata"].get("managedFields") or []:
        if entry["manager"] == manager:
            continue
        kept = (_paths(entry.get("fieldsV1") or {}) - paths) & present
        if kept:
            entries.append({**entry, "fieldsV1": _fields_v1(kept)})
    if mine & present:
        entries.append(_entry(manager, operation, mine & present))
    return entries


def register_crd(emulator: kmock.KubernetesEmulator, crd: dict) -> None:
    spec = crd["spec"]
    for version in spec["versions"]:
        emulator.resources[f"{spec['group']}/{version['name']}/{spec['names']['plural']}"] = dict(
            kind=spec["names"]["kind"], singular=spec["names"].get("singular"),
            namespaced=spec["scope"] == "Namespaced", shortnames=set(spec["names"].get("shortNames", [])),
            verbs=VERBS, subresources=set(version.get("subresources", {})))


def write_kubeconfig(path: pathlib.Path, url: str, token: str) -> pathlib.Path:
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "emulator",
              "clusters": [{"name": "emulator", "cluster": {"server": url}}],
              "users": [{"name": "emulator", "user": {"token": token}}],
              "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator",
                                                            "namespace": "default"}}]}
    path.write_text(yaml.safe_dump(config))
    return path


class EmulatorThread:
    """Runs the emulator on 127.0.0.1 in a daemon thread; `url` and `kubeconfig()` for clients."""

    def __init__(self, crds: list[dict] = (), history: int | None = None, chart_sets: tuple[str, ...] = CLUSTER_WIDE):
        self.crds = list(crds)
        self.chart_sets = chart_sets
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
            for crd in self.crds:
                register_crd(emulator, crd)
            emulator.history = self.history
            emulator.authorizer = chart_authorizer(*self.chart_sets)
            emulator.policies = chart_policies(*self.chart_sets)
            self.emulator = emulator
            self.url = f"http://127.0.0.1:{server.port}"
            self.started.set()
            await self._stop.wait()

    def kubeconfig(self, path: pathlib.Path, token: str = OPERATOR_TOKEN) -> pathlib.Path:
        return write_kubeconfig(path, self.url, token)


def _selected(obj: dict, request) -> bool:
    """Whether `obj` matches the request's `labelSelector` (equality terms, as the operator sends)."""
    selector = request.params.get("labelSelector") or ""
    wanted = dict(term.split("=", 1) for term in selector.split(",") if "=" in term)
    return all((obj["metadata"].get("labels") or {}).get(k) == v for k, v in wanted.items())
