"""Pure builders: a SplitInference spec in, the Kubernetes objects that serve it out.

No I/O and no clock: the same spec always gives the same dicts (names, labels, owner references),
so they are tested without a server and applied idempotently by the handlers.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
from dataclasses import dataclass

from phasesplit.control import spec as si
from phasesplit.control.worker_settings import METRICS_PORT, worker_settings

WORKER_PORT = 50051
WORKER_HEALTH_PORT = 50050  # the gRPC health service, apart from the work's threads (probes only)
LIVENESS_SERVICE = "liveness"  # stays SERVING while the worker drains; "" (readiness) does not
TOKEN_KEY = "token"  # in the SplitInference's worker-token Secret
TOKEN_ENV = "PHASESPLIT_WORKER_TOKEN"  # phasesplit.auth.TOKEN_ENV (the operator imports no grpc)
# On the pod templates that read the token: the uid of the Secret it came from (a new one rolls them).
TOKEN_REVISION_ANNOTATION = "phasesplit.io/worker-token-uid"
ROUTER_PORT = 8000
MODEL_DIR = "/models/model"
CLUSTER_DOMAIN = "cluster.local"  # the cluster's DNS domain, unless the operator is told another
MANAGED_BY = "phasesplit-operator"
ROLE_LABEL = "phasesplit.io/role"
RUN_AS = 10001
# A terminating worker keeps serving this long before SIGTERM starts its drain: the router re-resolves
# the pool's headless Service every 5 s, and the cluster DNS may serve the old answer for another 5 s
# (CoreDNS's default TTL); requests the router sent it meanwhile (a token worker's KV still to
# come from a prompt worker) must land before a draining worker refuses new work.
PRESTOP_SECONDS = 15
# A terminating router keeps serving this long before SIGTERM, while the Service's endpoints drop it,
# then finishes the streams it holds for up to ROUTER_SHUTDOWN_SECONDS (aiohttp's shutdown timeout).
ROUTER_PRESTOP_SECONDS = 10
ROUTER_SHUTDOWN_SECONDS = 60
# Workers listen (gRPC, the KV port, the rendezvous store) on the pod's address only.
POD_IP_ENV = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
# glibc keeps large KV buffers mapped instead of faulting fresh pages (see the KV transport notes).
MALLOC_ENV = [{"name": "MALLOC_MMAP_THRESHOLD_", "value": "134217728"},
              {"name": "MALLOC_TRIM_THRESHOLD_", "value": "1073741824"}]


@dataclass(frozen=True, slots=True)
class Owner:
    """The SplitInference that owns the children, and the DNS domain of the cluster it runs in."""
    name: str
    namespace: str
    uid: str
    cluster_domain: str = CLUSTER_DOMAIN

    def reference(self) -> dict:
        return {"apiVersion": f"{si.API_GROUP}/{si.API_VERSION}", "kind": si.KIND, "name": self.name,
                "uid": self.uid, "controller": True, "blockOwnerDeletion": True}


# --- names and labels ------------------------------------------------------------------------

def router_name(owner: Owner) -> str:
    return f"{owner.name}-router"


def service_name(owner: Owner) -> str:
    return owner.name


def pool_name(owner: Owner, role: str) -> str:
    return f"{owner.name}-{role}"


def config_name(owner: Owner, role: str, data: dict[str, str]) -> str:
    """Named by a hash of its content: a changed setting makes a new ConfigMap, and the pool's pods
    roll onto it, while pods still running keep the one they started with."""
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]
    return f"{owner.name}-{role}-engine-{digest}"


def token_secret_name(owner: Owner) -> str:
    return f"{owner.name}-worker-token"


def network_policy_name(owner: Owner) -> str:
    return f"{owner.name}-workers"


def service_host(owner: Owner, service: str) -> str:
    return f"{service}.{owner.namespace}.svc.{owner.cluster_domain}"


def endpoint(owner: Owner, port: int) -> str:
    return f"http://{service_host(owner, service_name(owner))}:{port}"


def selector_labels(owner: Owner, role: str) -> dict:
    return {"app.kubernetes.io/name": "phasesplit", "app.kubernetes.io/instance": owner.name, ROLE_LABEL: role}


def labels(owner: Owner, role: str) -> dict:
    return {**selector_labels(owner, role), "app.kubernetes.io/component": role,
            "app.kubernetes.io/part-of": "phasesplit", "app.kubernetes.io/managed-by": MANAGED_BY}


def metadata(owner: Owner, name: str, role: str, annotations: dict | None = None) -> dict:
    meta = {"name": name, "namespace": owner.namespace, "labels": labels(owner, role),
            "ownerReferences": [owner.reference()]}
    if annotations:
        meta["annotations"] = annotations
    return meta


# --- the engine settings ---------------------------------------------------------------------

def engine_settings(spec: si.SplitInferenceSpec, role: str) -> dict[str, str]:
    """ConfigMap data: the settings one pool's workers read, one key per flag."""
    return {s.key: s.value for s in worker_settings(spec, role, MODEL_DIR) if s.key}


def build_config_map(owner: Owner, spec: si.SplitInferenceSpec, role: str) -> dict:
    """Immutable: never patched under running pods."""
    data = engine_settings(spec, role)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(owner, config_name(owner, role, data), role),
            "immutable": True, "data": data}


# --- images ----------------------------------------------------------------------------------

def operator_version() -> str:
    return importlib.metadata.version("phasesplit")


def worker_image(spec: si.SplitInferenceSpec, pool: si.Pool) -> str:
    """The spec's image, else the operator's own version (so that upgrading the operator moves the
    pods), built with CUDA torch for pools that request GPUs."""
    cuda = "-cuda" if si.requests_gpu(pool.resources) else ""
    return spec.images.worker or f"{si.IMAGE_REPOSITORY}:{operator_version()}{cuda}"


def router_image(spec: si.SplitInferenceSpec) -> str:
    return spec.images.router or f"{si.IMAGE_REPOSITORY}:{operator_version()}"


# --- pods ------------------------------------------------------------------------------------

def model_volume(spec: si.SplitInferenceSpec) -> tuple[dict, dict]:
    """The model volume and its read-only mount at MODEL_DIR."""
    source = spec.model.source
    mount = {"name": "model", "mountPath": MODEL_DIR, "readOnly": True}
    if source.pvc:
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": source.pvc.claim_name, "readOnly": True}}
        sub_path = source.pvc.path
    elif source.host_path:
        volume = {"name": "model", "hostPath": {"path": source.host_path.path, "type": "Directory"}}
        sub_path = ""
    else:
        volume = {"name": "model", "image": {"reference": source.image.reference,
                                             "pullPolicy": source.image.pull_policy}}
        sub_path = source.image.path
    if sub_path.strip("/"):
        mount["subPath"] = sub_path.strip("/")
    return volume, mount


def container_security() -> dict:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def pod_security() -> dict:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"}}


def shm_size(tensor_parallel_size: int) -> str:
    """/dev/shm for a worker: NCCL's intra-pod transport keeps its buffers there, per pair of ranks."""
    return "1Gi" if tensor_parallel_size == 1 else f"{2 * tensor_parallel_size}Gi"


def _scratch_volumes(shm: str | None) -> tuple[list[dict], list[dict]]:
    """Writable /tmp (the root filesystem is read-only) and, for workers, a larger /dev/shm."""
    volumes = [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}]
    if shm:
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}})
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
    return volumes, mounts


def _placement(node_selector: dict, tolerations: list, affinity: dict | None) -> dict:
    out = {}
    if node_selector:
        out["nodeSelector"] = dict(node_selector)
    if tolerations:
        out["tolerations"] = [dict(t) for t in tolerations]
    if affinity:
        out["affinity"] = dict(affinity)
    return out


def _resources(resources: si.Resources) -> dict:
    return {key: dict(value) for key, value in (("requests", resources.requests), ("limits", resources.limits))
            if value}


def _pod_spec(spec: si.SplitInferenceSpec, container: dict, placement: dict, grace: int, shm: str | None,
              model: bool = True) -> dict:
    """`model`: mount the model volume (workers); the router reads the tokenizer from a worker instead."""
    volumes, mounts = _scratch_volumes(shm)
    if model:
        volume, mount = model_volume(spec)
        volumes, mounts = [volume, *volumes], [mount, *mounts]
    container["volumeMounts"] = mounts
    pod = {"automountServiceAccountToken": False, "enableServiceLinks": False,
           "securityContext": pod_security(), "terminationGracePeriodSeconds": grace,
           "containers": [container], "volumes": volumes, **placement}
    if spec.images.pull_secrets:
        pod["imagePullSecrets"] = [{"name": name} for name in spec.images.pull_secrets]
    return pod


def _deployment(owner: Owner, name: str, role: str, replicas: int, pod_spec: dict, pod_annotations: dict,
                rollout: si.PoolRollout | None = None) -> dict:
    rollout = rollout or si.PoolRollout()
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": metadata(owner, name, role),
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": 1800,  # model loading can take many minutes
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": rollout.max_surge,
                                                                    "maxUnavailable": rollout.max_unavailable}},
            "selector": {"matchLabels": selector_labels(owner, role)},
            "template": {"metadata": {"labels": labels(owner, role),
                                      **({"annotations": pod_annotations} if pod_annotations else {})},
                         "spec": pod_spec},
        },
    }


# --- workers ---------------------------------------------------------------------------------

def worker_args(spec: si.SplitInferenceSpec, role: str, pool: si.Pool) -> list[str]:
    """`phasesplit worker` arguments; engine settings come from the ConfigMap as $(VAR) references."""
    args = ["worker", "--role", role, "--model", MODEL_DIR, "--served-model-name", spec.model.name,
            "--host", "$(POD_IP)", "--port", str(WORKER_PORT), "--health-port", str(WORKER_HEALTH_PORT),
            "--drain-timeout", str(pool.drain_timeout_seconds)]
    return (args + [arg for setting in worker_settings(spec, role, MODEL_DIR) for arg in setting.reference()]
            + si.logging_flags(spec))


def _nccl_env(spec: si.SplitInferenceSpec) -> list[dict]:
    nccl = spec.kv_transfer.nccl
    env = []
    if nccl.socket_ifname:
        env.append({"name": "NCCL_SOCKET_IFNAME", "value": nccl.socket_ifname})
    if nccl.ib_hca:
        env.append({"name": "NCCL_IB_HCA", "value": nccl.ib_hca})
    return env


def _grpc_probe(period: int, failures: int, service: str = "") -> dict:
    grpc = {"port": WORKER_HEALTH_PORT, **({"service": service} if service else {})}
    return {"grpc": grpc, "periodSeconds": period, "timeoutSeconds": 5, "failureThreshold": failures}


def token_env(owner: Owner) -> dict:
    """The SplitInference's worker token (`build_token_secret`), for its router and workers."""
    return {"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": token_secret_name(owner), "key": TOKEN_KEY}}}


def build_token_secret(owner: Owner, token: str) -> dict:
    """Made when missing, never read nor patched (see `reconcile.ensure_token_secret`): the credentials of
    every router and worker of the SplitInference derive from it."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": metadata(owner, token_secret_name(owner), "credentials"),
            "data": {TOKEN_KEY: base64.b64encode(token.encode()).decode()}}


def with_token_revision(children: list[dict], revision: str | None) -> list[dict]:
    """`children`, whose Deployments that read the worker token name the Secret it came from (`revision`:
    its uid; None leaves them as built), so that a Secret made anew rolls them onto its token."""
    if revision is None:
        return children
    for child in children:
        template = child["spec"]["template"] if child["kind"] == "Deployment" else None
        if template and any(env.get("name") == TOKEN_ENV for c in template["spec"]["containers"]
                            for env in c.get("env", [])):
            template["metadata"].setdefault("annotations", {})[TOKEN_REVISION_ANNOTATION] = revision
    return children


def worker_container(spec: si.SplitInferenceSpec, owner: Owner, role: str, pool: si.Pool) -> dict:
    env = [*MALLOC_ENV, {"name": "HOME", "value": "/tmp"}, POD_IP_ENV, token_env(owner), *_nccl_env(spec),
           *(e.model_dump(by_alias=True, exclude_none=True) for e in pool.env)]
    ports = [{"name": "grpc", "containerPort": WORKER_PORT, "protocol": "TCP"},
             {"name": "health", "containerPort": WORKER_HEALTH_PORT, "protocol": "TCP"},
             {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}]
    if spec.kv_transfer.backend == "nccl":
        ports.append({"name": "nccl", "containerPort": spec.kv_transfer.nccl.port, "protocol": "TCP"})
    if spec.kv_transfer.backend == "tcp":
        ports.append({"name": "kv-tcp", "containerPort": spec.kv_transfer.tcp.port, "protocol": "TCP"})
    container = {
        "name": "worker", "image": worker_image(spec, pool), "imagePullPolicy": spec.images.pull_policy,
        "args": worker_args(spec, role, pool),
        "envFrom": [{"configMapRef": {"name": config_name(owner, role, engine_settings(spec, role))}}],
        "env": env, "ports": ports,
        # Readiness: SERVING once the model is loaded, until the drain; liveness: while the process runs.
        "startupProbe": _grpc_probe(period=5, failures=360),
        "readinessProbe": _grpc_probe(period=5, failures=2),
        "livenessProbe": _grpc_probe(period=10, failures=6, service=LIVENESS_SERVICE),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SECONDS}}},
        "securityContext": container_security(),
    }
    if resources := _resources(pool.resources):
        container["resources"] = resources
    return container


def build_pool_deployment(owner: Owner, spec: si.SplitInferenceSpec, role: str) -> dict:
    pool = getattr(spec.pools, role)
    container = worker_container(spec, owner, role, pool)
    placement = _placement(pool.node_selector, pool.tolerations, pool.affinity)
    grace = PRESTOP_SECONDS + pool.drain_timeout_seconds + 10  # slack beyond the drain timeout
    shm = str(pool.pod.shm_size) if pool.pod.shm_size is not None else shm_size(pool.tensor_parallel_size)
    pod_spec = _pod_spec(spec, container, placement, grace, shm=shm)
    scrape = {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT), "prometheus.io/path": "/metrics"}
    deployment = _deployment(owner, pool_name(owner, role), role, pool.replicas, pod_spec, scrape, pool.rollout)
    _overlay(deployment["spec"]["template"], pool.pod)
    return deployment


def _overlay(template: dict, pod: si.PodOverlay) -> None:
    """Adds the pool's `pod` overlay to its template (the operator's own labels and volumes stay)."""
    meta, spec, container = template["metadata"], template["spec"], template["spec"]["containers"][0]
    meta["labels"] = {**pod.labels, **meta["labels"]}
    if pod.annotations:
        meta["annotations"] = {**pod.annotations, **meta.get("annotations", {})}
    for key, value in (("topologySpreadConstraints", pod.topology_spread_constraints),
                       ("priorityClassName", pod.priority_class_name), ("runtimeClassName", pod.runtime_class_name),
                       ("schedulerName", pod.scheduler_name)):
        if value:
            spec[key] = [dict(v) for v in value] if isinstance(value, list) else value
    spec["volumes"] += [dict(v) for v in pod.volumes]
    container["volumeMounts"] += [dict(m) for m in pod.volume_mounts]
    if pod.add_capabilities:
        container["securityContext"]["capabilities"]["add"] = list(pod.add_capabilities)


def build_pool_disruption_budget(owner: Owner, spec: si.SplitInferenceSpec, role: str) -> dict:
    """A node drain takes at most `maxDisrupted` of the pool's pods down at once."""
    pool = getattr(spec.pools, role)
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": metadata(owner, pool_name(owner, role), role),
            "spec": {"maxUnavailable": pool.max_disrupted, "selector": {"matchLabels": selector_labels(owner, role)}}}


def build_pool_service(owner: Owner, role: str) -> dict:
    """Headless: the router resolves it to every ready worker (`dns:` worker lists)."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata(owner, pool_name(owner, role), role),
            "spec": {"clusterIP": "None", "selector": selector_labels(owner, role),
                     "ports": [{"name": "grpc", "port": WORKER_PORT, "targetPort": "grpc", "protocol": "TCP",
                                "appProtocol": "grpc"}]}}


# --- the router ------------------------------------------------------------------------------

def router_args(owner: Owner, spec: si.SplitInferenceSpec) -> list[str]:
    """No `--model`: the router reads the tokenizer from its first ready worker, so it mounts no model
    (a ReadWriteOnce claim stays on the GPU nodes, a model image is not pulled on the router's node)."""
    args = ["router", "--served-model-name", spec.model.name, "--host", "0.0.0.0", "--port", str(ROUTER_PORT)]
    for role, _ in spec.pools.items():
        args += [f"--{role}-workers", f"dns:{service_host(owner, pool_name(owner, role))}:{WORKER_PORT}"]
    if spec.router.replicas > 1:   # each admits its share of the workers' batches (only then: no restart)
        args += ["--replicas", str(spec.router.replicas)]
    return args + si.router_flags(spec) + si.logging_flags(spec)


def router_container(owner: Owner, spec: si.SplitInferenceSpec) -> dict:
    env = [{"name": "HOME", "value": "/tmp"}, token_env(owner)]
    if secret := spec.router.api_key_secret:
        env.append({"name": "PHASESPLIT_API_KEY",
                    "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}}})
    alive = {"path": "/livez", "port": "http"}  # the process answers
    routable = {"path": "/health", "port": "http"}  # 503 while a pool has no ready worker (unless scaled to zero)
    container = {
        "name": "router", "image": router_image(spec), "imagePullPolicy": spec.images.pull_policy,
        "args": router_args(owner, spec), "env": env,
        "ports": [{"name": "http", "containerPort": ROUTER_PORT, "protocol": "TCP"}],
        "startupProbe": {"httpGet": alive, "periodSeconds": 5, "failureThreshold": 120},
        "readinessProbe": {"httpGet": routable, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {"httpGet": alive, "periodSeconds": 10, "failureThreshold": 6},
        "lifecycle": {"preStop": {"sleep": {"seconds": ROUTER_PRESTOP_SECONDS}}},
        "securityContext": container_security(),
    }
    if resources := _resources(spec.router.resources):
        container["resources"] = resources
    return container


def build_router_deployment(owner: Owner, spec: si.SplitInferenceSpec) -> dict:
    router = spec.router
    placement = _placement(router.node_selector, router.tolerations, router.affinity)
    grace = ROUTER_PRESTOP_SECONDS + ROUTER_SHUTDOWN_SECONDS + 10
    pod_spec = _pod_spec(spec, router_container(owner, spec), placement, grace=grace, shm=None, model=False)
    scrape = {"prometheus.io/scrape": "true", "prometheus.io/port": str(ROUTER_PORT), "prometheus.io/path": "/metrics"}
    return _deployment(owner, router_name(owner), "router", router.replicas, pod_spec, scrape)


def build_router_service(owner: Owner, spec: si.SplitInferenceSpec) -> dict:
    service = spec.router.service
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata(owner, service_name(owner), "router"),
            "spec": {"type": service.type, "selector": selector_labels(owner, "router"),
                     "ports": [{"name": "http", "port": service.port, "targetPort": "http", "protocol": "TCP",
                                "appProtocol": "http"}]}}


# --- network policy --------------------------------------------------------------------------

def build_network_policy(owner: Owner, spec: si.SplitInferenceSpec) -> dict:
    """Only this SplitInference's router and workers reach the worker ports; anyone may read their metrics."""
    roles = [role for role, _ in spec.pools.items()]
    members = {"app.kubernetes.io/name": "phasesplit", "app.kubernetes.io/instance": owner.name}
    workers = {"matchLabels": members, "matchExpressions": [{"key": ROLE_LABEL, "operator": "In", "values": roles}]}
    # A tensor-parallel token worker's rank r takes its KV shard on each of these ports + r.
    ranks = max(pool.tensor_parallel_size for role, pool in spec.pools.items() if role != "prompt")
    ingress = [{"from": [{"podSelector": {"matchLabels": members}}], "ports": [_port_range(WORKER_PORT, ranks)]}]
    if spec.kv_transfer.backend == "nccl":
        # NCCL opens its own ephemeral ports between prompt and token workers.
        ingress.append({"from": [{"podSelector": workers}]})
    if spec.kv_transfer.backend == "tcp":  # prompt workers send the KV bytes to the token workers' KV port
        ingress.append({"from": [{"podSelector": workers}], "ports": [_port_range(spec.kv_transfer.tcp.port, ranks)]})
    ingress.append({"ports": [{"port": METRICS_PORT, "protocol": "TCP"}]})   # Prometheus, wherever it runs
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": metadata(owner, network_policy_name(owner), "network"),
            "spec": {"podSelector": workers, "policyTypes": ["Ingress"], "ingress": ingress}}


def _port_range(first: int, count: int) -> dict:
    return {"protocol": "TCP", "port": first, **({"endPort": first + count - 1} if count > 1 else {})}


# --- everything ------------------------------------------------------------------------------

def build_children(owner: Owner, spec: si.SplitInferenceSpec) -> list[dict]:
    """Every child object of a SplitInference, in the order to create them."""
    children = []
    for role, _ in spec.pools.items():
        children += [build_config_map(owner, spec, role), build_pool_service(owner, role),
                     build_pool_deployment(owner, spec, role), build_pool_disruption_budget(owner, spec, role)]
    children += [build_router_service(owner, spec), build_router_deployment(owner, spec),
                 build_network_policy(owner, spec)]
    from phasesplit.operator.scaler_objects import build_scaling_objects  # it builds on this module
    return children + build_scaling_objects(owner, spec)


def autoscaler_owns_replicas(spec: si.SplitInferenceSpec) -> bool:
    return spec.autoscaling.mode != "none"
