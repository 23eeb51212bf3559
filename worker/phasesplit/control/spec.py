"""The SplitInference spec as pydantic models: defaults, bounds and cross-field rules.

One source for the operator, its CRD (phasesplit.operator.crd turns these models into the
OpenAPI schema; each `cel(...)` rule becomes an `x-kubernetes-validations` entry) and local mode.
Every cross-field rule is written twice, as CEL for the API server and as a validator here, and a
test checks that both reject the same specs. Keep this module free of kopf and kubernetes imports.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator
from pydantic.alias_generators import to_camel

from phasesplit import logs
from phasesplit.control.worker_config import DTYPES, ROLES, default
from phasesplit.transport.backends import NAMES as KV_BACKENDS

API_GROUP = "phasesplit.io"
API_VERSION = "v1alpha1"
KIND = "SplitInference"
PLURAL = "splitinferences"
POOL_ROLES = ROLES
IMAGE_REPOSITORY = "phasesplit/worker"  # unset images: this repository at the operator's own version

_QUANTITY_PATTERN = r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[numkKMGTPE]i?)?$"
_QUANTITY = re.compile(_QUANTITY_PATTERN)
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# A SplitInference's name becomes its router Service's name, which must be an RFC 1035 label.
RFC1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


def cel(rule: str, message: str, field_path: str | None = None) -> dict:
    """One CEL rule for the CRD (`x-kubernetes-validations`); fieldPath names the offending field."""
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


def _validations(*rules: dict) -> ConfigDict:
    return ConfigDict(json_schema_extra={"x-kubernetes-validations": list(rules)})


def _check_quantity(value: int | float | str) -> int | float | str:
    if isinstance(value, str) and not _QUANTITY.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 500m, 2, 4Gi)")
    return value


Quantity = Annotated[int | str, WithJsonSchema({"x-kubernetes-int-or-string": True, "pattern": _QUANTITY_PATTERN,
                                                "anyOf": [{"type": "integer"}, {"type": "string"}]})]
# Kubernetes objects passed through to the pod spec as they are (the API server checks them there).
FreeObject = Annotated[dict[str, Any], WithJsonSchema({"type": "object",
                                                       "x-kubernetes-preserve-unknown-fields": True})]


class Spec(BaseModel):
    """Base: camelCase on the wire, unknown fields rejected."""
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


# --- the model -------------------------------------------------------------------------------

class PvcSource(Spec):
    claim_name: str = Field(min_length=1, max_length=253, description="PersistentVolumeClaim holding the model")
    path: str = Field("", max_length=1024, description="directory of the model inside the volume")


class HostPathSource(Spec):
    path: str = Field(min_length=2, max_length=1024, pattern=r"^/", description="absolute model directory on the node")


class ImageSource(Spec):
    reference: str = Field(min_length=1, max_length=512, description="OCI image holding the model files")
    path: str = Field("", max_length=1024, description="directory of the model inside the image")
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"


class ModelSource(Spec):
    model_config = _validations(cel(
        "(has(self.pvc) ? 1 : 0) + (has(self.hostPath) ? 1 : 0) + (has(self.image) ? 1 : 0) == 1",
        "exactly one of pvc, hostPath or image must be set"))
    pvc: PvcSource | None = None
    host_path: HostPathSource | None = None
    image: ImageSource | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if sum(s is not None for s in (self.pvc, self.host_path, self.image)) != 1:
            raise ValueError("exactly one of pvc, hostPath or image must be set")
        return self


class SimulatedEngine(Spec):
    """Workers that time each iteration by the performance model instead of running the model
    (`phasesplit worker --engine sim`): a pool layout tested without its GPUs. The model source
    still gives the tokenizer and config.json."""
    model: str = Field(default("sim_model"), min_length=1, max_length=128,
                       description="model name in the profile table")
    hardware: str = Field(default("sim_hardware"), min_length=1, max_length=128,
                          description="hardware of every pool, a name in the profile table")
    pool_hardware: dict[Literal[POOL_ROLES], str] = Field(
        default_factory=dict, description="hardware of individual pools, overriding `hardware`")
    tensor_parallel: int = Field(default("sim_tp"), ge=1, le=64,
                                 description="tensor-parallel size of one simulated instance")
    profiles: str | None = Field(None, min_length=1, max_length=1024,
                                 description="profile table (CSV) inside the model directory; default: the bundled one")
    time_scale: float = Field(default("sim_time_scale"), gt=0, le=1000,
                              description="every modelled time is multiplied by this")


class Model(Spec):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
                      description="served model name (the `model` field of OpenAI requests)")
    source: ModelSource
    dtype: Literal[DTYPES] = "bfloat16"  # the worker's own default is float32, for CPUs
    max_model_len: int | None = Field(None, ge=16, le=1048576, description="longest prompt plus output, in tokens")
    simulated: SimulatedEngine | None = None


# --- shared building blocks ------------------------------------------------------------------

class Resources(Spec):
    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)

    @field_validator("requests", "limits")
    @classmethod
    def _quantities(cls, value: dict) -> dict:
        for amount in value.values():
            _check_quantity(amount)
        return value


class EnvVar(Spec):
    name: str = Field(min_length=1, max_length=256, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    value: str | None = None
    value_from: FreeObject | None = None


class Images(Spec):
    worker: str | None = Field(None, min_length=1, description="image running `phasesplit worker`; default: "
                               f"{IMAGE_REPOSITORY}:<the operator's version>, -cuda for pools that request GPUs")
    router: str | None = Field(None, min_length=1, description="image running `phasesplit router`; default: "
                               f"{IMAGE_REPOSITORY}:<the operator's version>")
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    pull_secrets: list[str] = Field(default_factory=list, description="names of image pull Secrets")


# --- the router ------------------------------------------------------------------------------

class RouterService(Spec):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    port: int = Field(8000, ge=1, le=65535)


class SecretKeyRef(Spec):
    name: str = Field(min_length=1, max_length=253)
    key: str = Field("api-key", min_length=1, max_length=253)


def _router_resources() -> Resources:
    return Resources(requests={"cpu": "500m", "memory": "512Mi"}, limits={"memory": "1Gi"})


class Migration(Spec):
    max_attempts: int = Field(3, ge=0, le=100, description="times a request may move to another worker once its "
                              "output has started (a worker lost, stalled or cutting its stream); 0 turns migration off")
    stall_timeout_seconds: float = Field(30.0, gt=0, le=3600, description="seconds without a token, once output has "
                                         "started, before the router counts the worker as stalled and migrates")


class Admission(Spec):
    max_queue_wait_seconds: float = Field(30.0, gt=0, le=3600, description="seconds a request may wait for room in "
                                          "the workers' batches; one that cannot start within it is refused with a "
                                          "429 and Retry-After (a pool with no ready worker is waited for apart: "
                                          "scale-from-zero)")
    max_queue_length: int = Field(1024, ge=0, le=1000000, description="requests that may wait for room at once; "
                                  "one more is refused with a 429 at once")
    max_streams_per_key: int = Field(1024, ge=0, le=1000000, description="requests one API key may have in flight "
                                     "(without apiKeySecret: all clients together); more are refused with a 429; "
                                     "0: no limit")


class Routing(Spec):
    policy: Literal["cacheAware", "leastLoaded"] = Field("cacheAware", description="cacheAware: each request goes "
                                                         "to the workers whose prefix caches hold most of its prompt, "
                                                         "weighed against their load (the token worker first, then "
                                                         "the prompt worker); leastLoaded: join-the-shortest-queue")
    cache_threshold: float = Field(0.5, ge=0, le=1, description="cacheAware: the share of a prompt a worker must "
                                   "hold cached for its cache to steer the pick (below it: the least loaded worker)")
    balance_slack: int = Field(8, ge=0, le=1000000, description="cacheAware: requests in flight above the least "
                               "busy prompt worker that a worker holding the prompt may have and still be picked")
    local_prefill_tokens: int = Field(0, ge=0, le=1048576, description="cacheAware, conditional disaggregation: "
                                      "when the chosen token worker's cache holds all of a prompt but at most this "
                                      "many tokens, it computes them itself (no prompt worker, no KV transfer); "
                                      "0: never")


EXPOSED_SERVICE_TYPES = ("NodePort", "LoadBalancer")  # reachable from outside the cluster
UNAUTHENTICATED_MESSAGE = ("apiKeySecret: a NodePort or LoadBalancer router is reachable from outside the cluster "
                           "and needs an API key (or allowUnauthenticated: true)")


class Router(Spec):
    model_config = _validations(cel(
        "self.service.type == 'ClusterIP' || has(self.apiKeySecret) || self.allowUnauthenticated",
        UNAUTHENTICATED_MESSAGE, ".apiKeySecret"))
    replicas: int = Field(1, ge=0, le=100)
    migration: Migration = Field(default_factory=Migration)
    routing: Routing = Field(default_factory=Routing, description="how the router picks the workers of a request")
    admission: Admission = Field(default_factory=Admission, description="what the router admits when the workers' "
                                 "batches are full (each router replica counts its own requests)")
    service: RouterService = Field(default_factory=RouterService)
    api_key_secret: SecretKeyRef | None = Field(None, description="Secret whose key is the required bearer token")
    allow_unauthenticated: bool = Field(False, description="serve a NodePort or LoadBalancer router without "
                                        "apiKeySecret (refused otherwise)")
    resources: Resources = Field(default_factory=_router_resources)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[FreeObject] = Field(default_factory=list)
    affinity: FreeObject | None = None

    @model_validator(mode="after")
    def _exposed_needs_key(self) -> Router:
        if self.service.type in EXPOSED_SERVICE_TYPES and not self.api_key_secret and not self.allow_unauthenticated:
            raise ValueError(UNAUTHENTICATED_MESSAGE)
        return self


def router_flags(spec: "SplitInferenceSpec") -> list[str]:
    """The router's command-line flags that come from the spec (the operator and local mode both pass them)."""
    migration, admission = spec.router.migration, spec.router.admission
    flags = ["--max-migrations", str(migration.max_attempts), "--stall-timeout", f"{migration.stall_timeout_seconds:g}",
             "--max-queue-wait", f"{admission.max_queue_wait_seconds:g}",
             "--max-queue-length", str(admission.max_queue_length),
             "--max-streams-per-key", str(admission.max_streams_per_key)]
    routing = spec.router.routing
    flags += ["--routing", routing.policy, "--routing-cache-threshold", f"{routing.cache_threshold:g}",
              "--routing-balance-slack", str(routing.balance_slack)]
    if routing.local_prefill_tokens:  # only when set, so that routers of specs without it do not restart
        flags += ["--routing-local-prefill-tokens", str(routing.local_prefill_tokens)]
    if spec.model.max_model_len:
        flags += ["--max-model-len", str(spec.model.max_model_len)]
    return flags


# --- the pools -------------------------------------------------------------------------------

class PoolAutoscaling(Spec):
    model_config = _validations(
        cel("self.minReplicas <= self.maxReplicas", "minReplicas must be <= maxReplicas", ".minReplicas"),
        cel("self.metric != 'kvUtilization' || self.targetPerReplica <= 1.0",
            "targetPerReplica is a fraction (<= 1) when metric is kvUtilization", ".targetPerReplica"))
    min_replicas: int = Field(1, ge=0, le=1000)
    max_replicas: int = Field(4, ge=1, le=1000)
    metric: Literal["queueTokens", "queueRequests", "inflightRequests", "kvUtilization"] = "queueTokens"
    target_per_replica: float = Field(1024.0, gt=0, description="metric value one replica should carry")
    scale_up_max_step: int = Field(2, ge=1, le=100)
    scale_down_stabilization_seconds: int = Field(300, ge=0, le=86400)
    cooldown_seconds: int = Field(60, ge=0, le=86400)
    ttft_slo_seconds: float | None = Field(None, gt=0, description="time-to-first-token objective")
    tbt_slo_seconds: float | None = Field(None, gt=0, description="time-between-tokens objective")

    @model_validator(mode="after")
    def _bounds(self) -> PoolAutoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"minReplicas ({self.min_replicas}) must be <= maxReplicas ({self.max_replicas})")
        if self.metric == "kvUtilization" and self.target_per_replica > 1.0:
            raise ValueError(f"targetPerReplica is a fraction (<= 1) when metric is kvUtilization, "
                             f"not {self.target_per_replica:g}")
        return self


class EngineSettings(Spec):
    model_config = _validations(cel(
        "!(has(self.numKvBlocks) && has(self.kvMemoryFraction))",
        "set at most one of numKvBlocks and kvMemoryFraction", ".numKvBlocks"))
    max_num_batched_tokens: int = Field(default("max_num_batched_tokens"), ge=1, le=1048576,
                                        description="token budget per step")
    chunked_prefill: bool = Field(default("chunked_prefill"), description="split long prompts over several steps, "
                                  "each beside the running decodes (prompt workers always prefill whole prompts)")
    prefix_caching: bool = Field(default("prefix_caching"), description="reuse the KV of prompt blocks earlier "
                                 "requests computed (full blocks, by a hash of their tokens and the request's "
                                 "cache_salt); the cache takes only blocks no request holds")
    max_num_seqs: int = Field(default("max_num_seqs"), ge=1, le=4096, description="largest batch")
    num_kv_blocks: int | None = Field(None, ge=1, le=16777216, description="KV cache size in blocks")
    kv_memory_fraction: float | None = Field(None, gt=0, le=1, description="KV cache size as a share of free memory")
    block_size: int = Field(default("block_size"), ge=1, le=1024, description="tokens per KV block")
    device: Literal["cpu", "cuda"] | None = Field(None, description="default: cuda when the pool requests a GPU")

    @model_validator(mode="after")
    def _one_kv_size(self) -> EngineSettings:
        if self.num_kv_blocks is not None and self.kv_memory_fraction is not None:
            raise ValueError("set at most one of numKvBlocks and kvMemoryFraction")
        return self


def _pool_resources() -> Resources:
    return Resources(requests={"cpu": "1", "memory": "2Gi"})


GPU = "nvidia.com/gpu"
_GPU_RULE = ("!has(self.resources.{part}) || !('nvidia.com/gpu' in self.resources.{part}) || "
             "string(self.resources.{part}['nvidia.com/gpu']) == string(self.tensorParallelSize)")
_GPU_MESSAGE = "resources.{part}['nvidia.com/gpu'] must equal tensorParallelSize (one GPU per rank)"


RESERVED_VOLUMES = ("model", "tmp", "shm")  # the volumes the operator mounts itself
_RESERVED_PREFIXES = ("app.kubernetes.io/", "phasesplit.io/")  # the labels the Services select on
# Pinned (registered) memory for RDMA; every other capability stays dropped.
ALLOWED_CAPABILITIES = ("IPC_LOCK",)
# The volume types Pod Security's restricted level allows, and image volumes: nothing from the node.
ALLOWED_VOLUME_TYPES = ("configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "image", "persistentVolumeClaim",
                        "projected", "secret")
_CAPABILITIES_MESSAGE = f"addCapabilities: only {', '.join(ALLOWED_CAPABILITIES)} may be added (pinned memory for RDMA)"
_VOLUMES_MESSAGE = f"volumes: a name and one source each, of these types: {', '.join(ALLOWED_VOLUME_TYPES)}"
# A Volume: its name and one source, as a map so that CEL can see its keys.
VolumeObject = Annotated[dict[str, Any], WithJsonSchema({
    "type": "object", "maxProperties": 2, "additionalProperties": {"x-kubernetes-preserve-unknown-fields": True}})]


def _cel_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


class PodOverlay(Spec):
    """Added to a pool's pod template: what cluster policies, RDMA networking (Multus annotations,
    IPC_LOCK, a large /dev/shm) or a scheduler need, without forking the operator's templates."""
    model_config = _validations(
        cel("!has(self.labels) || self.labels.all(k, !k.startsWith('app.kubernetes.io/') && !k.startsWith('phasesplit.io/'))",
            "labels: app.kubernetes.io/ and phasesplit.io/ labels are the operator's (its selectors use them)"),
        cel(f"!has(self.addCapabilities) || self.addCapabilities.all(c, c in {_cel_list(ALLOWED_CAPABILITIES)})",
            _CAPABILITIES_MESSAGE, ".addCapabilities"),
        cel(f"!has(self.volumes) || self.volumes.all(v, v.all(k, k == 'name' || k in {_cel_list(ALLOWED_VOLUME_TYPES)}))",
            _VOLUMES_MESSAGE, ".volumes"))
    # Reserved volume names are checked here only.
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict, description="e.g. k8s.v1.cni.cncf.io/networks")
    topology_spread_constraints: list[FreeObject] = Field(default_factory=list)
    priority_class_name: str | None = None
    runtime_class_name: str | None = None
    scheduler_name: str | None = None
    volumes: list[VolumeObject] = Field(default_factory=list, max_length=32,
                                        description=f"types: {', '.join(ALLOWED_VOLUME_TYPES)}")
    volume_mounts: list[FreeObject] = Field(default_factory=list, description="mounts in the worker container")
    add_capabilities: list[Annotated[str, Field(pattern=r"^[A-Z_]+$", max_length=64)]] = Field(
        default_factory=list, max_length=8,
        description=f"Linux capabilities added to the worker container: {', '.join(ALLOWED_CAPABILITIES)} (for RDMA)")
    shm_size: Quantity | None = Field(None, description="size of /dev/shm (default: 1Gi, 2Gi per rank with tensor "
                                                        "parallelism)")

    @model_validator(mode="after")
    def _reserved(self) -> PodOverlay:
        if any(k.startswith(_RESERVED_PREFIXES) for k in self.labels):
            raise ValueError("labels: app.kubernetes.io/ and phasesplit.io/ labels are the operator's "
                             "(its selectors use them)")
        if any(v.get("name") in RESERVED_VOLUMES for v in self.volumes):
            raise ValueError("volumes: model, tmp and shm are the operator's own volume names")
        if any(c not in ALLOWED_CAPABILITIES for c in self.add_capabilities):
            raise ValueError(f"{_CAPABILITIES_MESSAGE}: {self.add_capabilities}")
        if any(len(v) > 2 or any(k != "name" and k not in ALLOWED_VOLUME_TYPES for k in v) for v in self.volumes):
            raise ValueError(f"{_VOLUMES_MESSAGE}: {[v.get('name') for v in self.volumes]}")
        return self


class PoolRollout(Spec):
    model_config = _validations(cel("self.maxSurge + self.maxUnavailable > 0",
                                    "maxSurge and maxUnavailable cannot both be 0 (the rollout could not start)"))
    max_surge: int = Field(1, ge=0, le=1000, description="extra pods during a rollout (0 where full GPU nodes "
                                                         "leave no room for one)")
    max_unavailable: int = Field(0, ge=0, le=1000, description="pods a rollout may take down before their "
                                                               "replacements are ready")

    @model_validator(mode="after")
    def _can_start(self) -> PoolRollout:
        if self.max_surge + self.max_unavailable == 0:
            raise ValueError("maxSurge and maxUnavailable cannot both be 0 (the rollout could not start)")
        return self


class Pool(Spec):
    model_config = _validations(
        cel("self.replicas >= self.autoscaling.minReplicas && self.replicas <= self.autoscaling.maxReplicas",
            "replicas must lie within autoscaling.minReplicas..maxReplicas", ".replicas"),
        *(cel(_GPU_RULE.format(part=part), _GPU_MESSAGE.format(part=part), ".tensorParallelSize")
          for part in ("requests", "limits")))
    replicas: int = Field(1, ge=0, le=1000, description="initial replicas (the autoscaler owns them afterwards)")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="ranks each worker shards the model over: one "
                                      "process per GPU (the pool's nvidia.com/gpu request), gloo ranks on CPU")
    autoscaling: PoolAutoscaling = Field(default_factory=PoolAutoscaling)
    resources: Resources = Field(default_factory=_pool_resources)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[FreeObject] = Field(default_factory=list)
    affinity: FreeObject | None = None
    drain_timeout_seconds: int = Field(int(default("drain_timeout")), ge=1, le=3600,
                                       description="on SIGTERM, time to finish in-flight sequences")
    env: list[EnvVar] = Field(default_factory=list)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    rollout: PoolRollout = Field(default_factory=PoolRollout)
    pod: PodOverlay = Field(default_factory=PodOverlay)
    max_disrupted: int = Field(1, ge=0, le=1000, description="pods a voluntary disruption (a node drain) may take "
                                                           "down at once (the pool's PodDisruptionBudget)")

    @model_validator(mode="after")
    def _replicas_in_bounds(self) -> Pool:
        low, high = self.autoscaling.min_replicas, self.autoscaling.max_replicas
        if not low <= self.replicas <= high:
            raise ValueError(f"replicas ({self.replicas}) must lie within autoscaling.minReplicas..maxReplicas "
                             f"({low}..{high})")
        for part in ("requests", "limits"):
            gpus = getattr(self.resources, part).get(GPU)
            if gpus is not None and str(gpus) != str(self.tensor_parallel_size):
                raise ValueError(_GPU_MESSAGE.format(part=part) + f": {gpus} != {self.tensor_parallel_size}")
        return self


SPLIT_TP_MESSAGE = ("prompt and token pools must have the same tensorParallelSize: each prompt rank sends its "
                    "KV-head shard to the token rank holding the same heads (no re-sharding)")


class Pools(Spec):
    model_config = _validations(
        cel("(has(self.prompt) && has(self.token)) || has(self.mixed)",
            "set both prompt and token pools (or a mixed pool)"),
        cel("!has(self.prompt) || !has(self.token) || self.prompt.engine.blockSize == self.token.engine.blockSize",
            "prompt and token pools must use the same engine.blockSize (the KV layout must match)",
            ".token"),
        cel("!has(self.prompt) || !has(self.token) || self.prompt.tensorParallelSize == self.token.tensorParallelSize",
            SPLIT_TP_MESSAGE, ".token.tensorParallelSize"))
    prompt: Pool | None = None
    token: Pool | None = None
    mixed: Pool | None = None

    @model_validator(mode="after")
    def _roles(self) -> Pools:
        if not ((self.prompt and self.token) or self.mixed):
            raise ValueError("set both prompt and token pools (or a mixed pool)")
        if self.prompt and self.token and self.prompt.engine.block_size != self.token.engine.block_size:
            raise ValueError("prompt and token pools must use the same engine.blockSize (the KV layout must match): "
                             f"prompt {self.prompt.engine.block_size}, token {self.token.engine.block_size}")
        if self.prompt and self.token and self.prompt.tensor_parallel_size != self.token.tensor_parallel_size:
            raise ValueError(f"{SPLIT_TP_MESSAGE}: prompt {self.prompt.tensor_parallel_size}, "
                             f"token {self.token.tensor_parallel_size}")
        return self

    def items(self) -> list[tuple[str, Pool]]:
        """The pools that are set, by role."""
        return [(role, pool) for role in POOL_ROLES if (pool := getattr(self, role)) is not None]


# --- KV transfer and autoscaling -------------------------------------------------------------

class NcclSettings(Spec):
    socket_ifname: str | None = Field(None, max_length=64, description="NCCL_SOCKET_IFNAME")
    ib_hca: str | None = Field(None, max_length=256, description="NCCL_IB_HCA")
    port: int = Field(29500, ge=1024, le=65535, description="first port of the process-group stores")


class TcpSettings(Spec):
    port: int = Field(29600, ge=1024, le=65535, description="port on token workers where the KV bytes arrive")


class KvTransfer(Spec):
    backend: Literal[KV_BACKENDS] = default("kv_backend")
    layerwise: bool = default("layerwise")
    timeout_seconds: float = Field(default("kv_transfer_timeout"), gt=0, le=3600)
    lease_seconds: float = Field(default("kv_lease"), gt=0, le=3600)
    nccl: NcclSettings = Field(default_factory=NcclSettings)
    tcp: TcpSettings = Field(default_factory=TcpSettings)


class Prometheus(Spec):
    url: str | None = Field(None, pattern=r"^https?://", description="Prometheus for the hpa/keda modes")


class PromptToTokenRatio(Spec):
    model_config = _validations(cel("!has(self.min) || !has(self.max) || self.min <= self.max",
                                    "min must be <= max", ".min"))
    min: float | None = Field(None, gt=0)
    max: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _order(self) -> PromptToTokenRatio:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        return self


class Autoscaling(Spec):
    model_config = _validations(cel("self.mode != 'keda' || has(self.prometheus.url)",
                                    "mode keda needs prometheus.url", ".prometheus"))
    mode: Literal["builtin", "hpa", "keda", "none"] = "builtin"
    interval_seconds: int = Field(15, ge=1, le=3600)
    prometheus: Prometheus = Field(default_factory=Prometheus)
    prompt_to_token_ratio: PromptToTokenRatio = Field(default_factory=PromptToTokenRatio)

    @model_validator(mode="after")
    def _keda_needs_prometheus(self) -> Autoscaling:
        if self.mode == "keda" and not self.prometheus.url:
            raise ValueError("mode keda needs prometheus.url")
        return self


# --- the resource ----------------------------------------------------------------------------

class Logging(Spec):
    format: Literal[logs.FORMATS] = Field(logs.FORMAT, description="the router's and workers' log lines: text for "
                                          "people, json for log collectors (one object per line); local mode "
                                          "takes its own --log-format")
    level: Literal[logs.LEVELS] = Field(logs.LEVEL, description="the least severe lines the router and workers "
                                        "write; local mode takes its own --log-level")


def logging_flags(spec: "SplitInferenceSpec") -> list[str]:
    """The router's and workers' logging flags; none at the defaults, so pods made before stay as they are."""
    flags = []
    if spec.logging.format != logs.FORMAT:
        flags += ["--log-format", spec.logging.format]
    if spec.logging.level != logs.LEVEL:
        flags += ["--log-level", spec.logging.level]
    return flags


class SplitInferenceSpec(Spec):
    model: Model
    images: Images = Field(default_factory=Images)
    router: Router = Field(default_factory=Router)
    pools: Pools
    kv_transfer: KvTransfer = Field(default_factory=KvTransfer)
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    logging: Logging = Field(default_factory=Logging)


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=45, pattern=RFC1035_LABEL)
    namespace: str | None = None


class SplitInference(Spec):
    """A whole SplitInference document (apiVersion, kind, metadata, spec); status is ignored."""
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")
    api_version: Literal["phasesplit.io/v1alpha1"] = "phasesplit.io/v1alpha1"
    kind: Literal["SplitInference"] = "SplitInference"
    metadata: Metadata
    spec: SplitInferenceSpec


def feasibility_problems(spec: SplitInferenceSpec, in_cluster: bool = True) -> list[str]:
    """What makes a schema-valid spec unable to work, one sentence each naming the field.

    `in_cluster=False` (local mode) skips what only a cluster needs: GPU resource requests (local mode
    runs the nccl backend over gloo when the caches are on the CPU)."""
    problems = []
    for role, pool in spec.pools.items():
        engine = pool.engine
        if spec.model.max_model_len and engine.num_kv_blocks is not None and role != "prompt":
            capacity = engine.num_kv_blocks * engine.block_size
            if capacity < spec.model.max_model_len:
                problems.append(
                    f"pools.{role}.engine.numKvBlocks: {engine.num_kv_blocks} blocks of {engine.block_size} tokens "
                    f"hold {capacity} tokens, fewer than model.maxModelLen ({spec.model.max_model_len})")
        if not in_cluster:
            continue
        if spec.kv_transfer.backend == "nccl" and role in ("prompt", "token") and not requests_gpu(pool.resources):
            problems.append(f"pools.{role}.resources: kvTransfer.backend nccl needs GPUs, "
                            f"but the pool requests no nvidia.com/gpu")
        if engine.device == "cuda" and not requests_gpu(pool.resources):
            problems.append(f"pools.{role}.engine.device: cuda needs a GPU, but the pool requests no nvidia.com/gpu")
    return problems


def requests_gpu(resources: Resources) -> bool:
    return any(key.endswith("/gpu") and str(amount) not in ("0", "") for key, amount in
               {**resources.requests, **resources.limits}.items())
