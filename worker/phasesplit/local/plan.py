"""What local mode runs for a SplitInference: the command lines of its workers and its router."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import pydantic
import yaml

from phasesplit.control import spec as si
from phasesplit.control.worker_config import default
from phasesplit.control.worker_settings import literal, worker_settings
from phasesplit.transport.backends import NAMES as KV_BACKENDS
from phasesplit.validation import one_line, yaml_problem


@dataclass(slots=True)
class PoolPlan:
    name: str  # also the workers' role
    replicas: int
    worker_args: list[str]
    tensor_parallel_size: int = 1  # a worker's rank r also listens on its port + r


@dataclass(slots=True)
class LocalPlan:
    name: str
    model_dir: str
    served_model_name: str
    router_port: int
    pools: dict[str, PoolPlan]
    drain_timeout: float
    spec: si.SplitInferenceSpec

    @property
    def router_args(self) -> list[str]:
        return si.router_flags(self.spec)


def read_manifest(path: str | pathlib.Path) -> si.SplitInference:
    """The SplitInference document from a YAML file (the first one of that kind in it); a ValueError names the
    file, the document and the field, as `phasesplit render` does."""
    try:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
    except yaml.YAMLError as e:
        raise ValueError(yaml_problem(path, e)) from None
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == si.KIND:
            name = (doc.get("metadata") or {}).get("name", "?")
            try:
                return validate_manifest(doc)
            except ValueError as e:
                raise ValueError(f"{path}: SplitInference {name!r}: {e}") from None
    raise ValueError(f"{path}: no document with kind: SplitInference")


def validate_manifest(doc: dict) -> si.SplitInference:
    """Checks the document with the spec's pydantic models, and what local mode needs of it."""
    try:
        resource = si.SplitInference.model_validate(doc)
    except pydantic.ValidationError as e:
        raise ValueError(one_line(e, si.SplitInference)) from None
    problems = si.feasibility_problems(resource.spec, in_cluster=False)
    if problems:
        raise ValueError("spec." + "; spec.".join(problems))
    return resource


def _overridden(spec: si.SplitInferenceSpec, device: str | None, kv_backend: str | None) -> si.SplitInferenceSpec:
    if kv_backend is not None:
        if kv_backend not in KV_BACKENDS:
            raise ValueError(f"--kv-backend must be one of {', '.join(KV_BACKENDS)}, got {kv_backend!r}")
        spec = spec.model_copy(update={"kv_transfer": spec.kv_transfer.model_copy(update={"backend": kv_backend})})
    if device is not None:
        pools = {role: pool.model_copy(update={"engine": pool.engine.model_copy(update={"device": device})})
                 for role, pool in spec.pools.items()}
        spec = spec.model_copy(update={"pools": spec.pools.model_copy(update=pools)})
    return spec


def build_plan(resource: si.SplitInference, model_dir: str | None = None, port: int | None = None,
               drain_timeout: float = default("drain_timeout"), device: str | None = None, kv_backend: str | None = None) -> LocalPlan:
    """`device` and `kv_backend` (grpc, nccl or tcp) override the spec's."""
    spec = _overridden(resource.spec, device, kv_backend)
    model_dir = model_dir or _host_path(spec.model)
    pools = {role: PoolPlan(role, pool.replicas, _worker_args(spec, role, model_dir, drain_timeout),
                            pool.tensor_parallel_size) for role, pool in spec.pools.items()}
    router_port = port if port is not None else spec.router.service.port
    return LocalPlan(name=resource.metadata.name, model_dir=model_dir, served_model_name=spec.model.name,
                     router_port=router_port, pools=pools, drain_timeout=drain_timeout, spec=spec)


def _worker_args(spec: si.SplitInferenceSpec, role: str, model_dir: str, drain_timeout: float) -> list[str]:
    own = literal({"role": role, "model": model_dir, "served_model_name": spec.model.name,
                   "drain_timeout": drain_timeout})
    return [arg for s in own + worker_settings(spec, role, model_dir, in_cluster=False) for arg in s.literal()]


def _host_path(model: si.Model) -> str:
    if model.source.host_path is None:
        raise ValueError("spec.model.source: local mode needs a hostPath source, or --model DIR")
    return model.source.host_path.path
