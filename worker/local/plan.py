"""What local mode runs for a SplitInference: the command lines of its workers and its router."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field

import yaml

POOLS = ("prompt", "token", "mixed")
KV_BACKENDS = ("grpc", "nccl", "tcp")


@dataclass(slots=True)
class PoolPlan:
    name: str  # also the workers' role
    replicas: int
    min_replicas: int
    max_replicas: int
    worker_args: list[str] = field(default_factory=list)
    autoscaling: dict = field(default_factory=dict)
    tensor_parallel_size: int = 1  # a worker's rank r also listens on its port + r


@dataclass(slots=True)
class LocalPlan:
    name: str
    model_dir: str
    served_model_name: str
    router_port: int
    pools: dict[str, PoolPlan]
    drain_timeout: float
    autoscaling: dict = field(default_factory=dict)


def read_manifest(path: str | pathlib.Path) -> dict:
    """The SplitInference document from a YAML file (the first one of that kind in it)."""
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for doc in docs:
        if doc.get("kind") == "SplitInference":
            return validate_manifest(doc)
    raise ValueError(f"{path}: no document with kind: SplitInference")


def validate_manifest(doc: dict) -> dict:
    """Checks the document with the spec's pydantic models; returns it in its canonical (camelCase) form."""
    from phasesplit.control import spec
    resource = spec.SplitInference.model_validate(doc)
    problems = spec.feasibility_problems(resource.spec, in_cluster=False)
    if problems:
        raise ValueError("spec." + "; spec.".join(problems))
    return resource.model_dump(by_alias=True, exclude_none=True, mode="json")


def build_plan(doc: dict, model_dir: str | None = None, port: int | None = None,
         drain_timeout: float = 30.0, device: str | None = None, kv_backend: str | None = None) -> LocalPlan:
    """`kv_backend` (grpc, nccl or tcp) overrides spec.kvTransfer.backend; each token worker's rendezvous
    store (nccl) or KV port (tcp) takes a free port, not the spec's, so that several fit on one machine."""
    spec = doc["spec"]
    model = spec["model"]
    model_dir = model_dir or _host_path(model)
    name = model.get("name") or doc["metadata"]["name"]
    kv = dict(spec.get("kvTransfer") or {})
    if kv_backend is not None:
        if kv_backend not in KV_BACKENDS:
            raise ValueError(f"--kv-backend must be one of {', '.join(KV_BACKENDS)}, got {kv_backend!r}")
        kv["backend"] = kv_backend
    common = ["--model", model_dir, "--served-model-name", name, "--drain-timeout", str(drain_timeout)]
    common += _model_args(model) + _kv_args(kv)
    if device:
        common += ["--device", device]
    pools = {}
    for pool_name, pool in (spec.get("pools") or {}).items():
        if pool_name not in POOLS or pool is None:
            continue
        pools[pool_name] = _pool_plan(pool_name, pool, common)
    if not pools.get("mixed") and not (pools.get("prompt") and pools.get("token")):
        raise ValueError("spec.pools: needs both a prompt and a token pool, or a mixed pool")
    router_port = port if port is not None else int(spec.get("router", {}).get("service", {}).get("port", 8000))
    return LocalPlan(name=doc["metadata"]["name"], model_dir=model_dir, served_model_name=name,
                     router_port=router_port, pools=pools, drain_timeout=drain_timeout,
                     autoscaling=spec.get("autoscaling") or {})


def _host_path(model: dict) -> str:
    path = ((model.get("source") or {}).get("hostPath") or {}).get("path")
    if not path:
        raise ValueError("spec.model.source: local mode needs a hostPath source, or --model DIR")
    return path


def _model_args(model: dict) -> list[str]:
    args = []
    if model.get("dtype"):
        args += ["--dtype", model["dtype"]]
    if model.get("maxModelLen"):
        args += ["--max-model-len", str(model["maxModelLen"])]
    return args


def _kv_args(kv: dict) -> list[str]:
    args = []
    if kv.get("backend"):
        args += ["--kv-backend", kv["backend"]]
    if kv.get("timeoutSeconds") is not None:
        args += ["--kv-transfer-timeout", str(kv["timeoutSeconds"])]
    if kv.get("leaseSeconds") is not None:
        args += ["--kv-lease", str(kv["leaseSeconds"])]
    if kv.get("layerwise") is False:
        args += ["--no-layerwise"]
    return args


ENGINE_FLAGS = {
    "blockSize": "--block-size",
    "numKvBlocks": "--num-kv-blocks",
    "kvMemoryFraction": "--kv-memory-fraction",
    "maxNumBatchedTokens": "--max-num-batched-tokens",
    "maxNumSeqs": "--max-num-seqs",
    "device": "--device",
}


def _pool_plan(name: str, pool: dict, common: list[str]) -> PoolPlan:
    args = ["--role", name, *common]
    for key, flag in ENGINE_FLAGS.items():
        value = (pool.get("engine") or {}).get(key)
        if value is not None:
            args += [flag, str(value)]
    if int(pool.get("tensorParallelSize", 1)) > 1:  # gloo ranks on the CPU unless the pool says cuda
        args += ["--tensor-parallel", str(pool["tensorParallelSize"])]
    replicas = int(pool.get("replicas", 1))
    scaling = pool.get("autoscaling") or {}
    return PoolPlan(name=name, replicas=replicas,
                    min_replicas=int(scaling.get("minReplicas", replicas)),
                    max_replicas=int(scaling.get("maxReplicas", replicas)),
                    worker_args=args, autoscaling=scaling,
                    tensor_parallel_size=int(pool.get("tensorParallelSize", 1)))
