"""What a pool's workers are told, from the spec: one typed list of `phasesplit worker` settings.

Each setting names its `WorkerConfig` field, which gives its flag and its ConfigMap key. The
operator renders the list as a ConfigMap and `$(KEY)` references in the container's arguments;
local mode renders the same list as literal flags.
"""

from __future__ import annotations

from dataclasses import dataclass

from phasesplit.control import spec as si
from phasesplit.control.worker_config import flag

METRICS_PORT = 8001   # a worker pod's own Prometheus /metrics (the container port named `metrics`)


@dataclass(frozen=True, slots=True)
class Setting:
    name: str                # the `WorkerConfig` field
    value: str | None        # None: a switch without a value
    key: str | None = None   # the ConfigMap key that carries the value; None: passed as it is

    def literal(self) -> list[str]:
        return [flag(self.name)] if self.value is None else [flag(self.name), self.value]

    def reference(self) -> list[str]:
        return [flag(self.name), f"$({self.key})"] if self.key else self.literal()


def number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def text(value) -> str:
    return number(value) if isinstance(value, float) else str(value)


def keyed(values: dict, prefix: str = "") -> list[Setting]:
    """Settings carried by the ConfigMap, each under its field's name in capitals (after `prefix`)."""
    return [Setting(name, text(v), prefix + name.upper()) for name, v in values.items() if v is not None]


def literal(values: dict) -> list[Setting]:
    return [Setting(name, text(v)) for name, v in values.items() if v is not None]


def _shared(spec: si.SplitInferenceSpec) -> list[Setting]:
    kv = spec.kv_transfer
    return keyed({"dtype": spec.model.dtype, "kv_backend": kv.backend, "kv_transfer_timeout": kv.timeout_seconds,
                  "kv_lease": kv.lease_seconds, "max_model_len": spec.model.max_model_len or None})


def _engine(role: str, pool: si.Pool, in_cluster: bool) -> list[Setting]:
    engine = pool.engine
    device = engine.device or (("cuda" if si.requests_gpu(pool.resources) else "cpu") if in_cluster else None)
    return keyed({"max_num_batched_tokens": engine.max_num_batched_tokens, "max_num_seqs": engine.max_num_seqs,
                  "block_size": engine.block_size, "device": device, "num_kv_blocks": engine.num_kv_blocks,
                  "kv_memory_fraction": engine.kv_memory_fraction}, prefix=f"{role.upper()}_")


def _simulated(spec: si.SplitInferenceSpec, role: str, model_dir: str) -> list[Setting]:
    """The settings that make a `role` worker simulated."""
    sim = spec.model.simulated
    if not sim:
        return []
    profiles = sim.profiles and f"{model_dir.rstrip('/')}/{sim.profiles.lstrip('/')}"
    return literal({"engine": "sim", "sim_model": sim.model, "sim_hardware": sim.pool_hardware.get(role, sim.hardware),
                    "sim_tp": sim.tensor_parallel, "sim_time_scale": sim.time_scale, "sim_profiles": profiles})


def worker_settings(spec: si.SplitInferenceSpec, role: str, model_dir: str, in_cluster: bool = True) -> list[Setting]:
    """The settings of one pool's workers (`model_dir`: where the workers find the model). `in_cluster=False`
    (local mode): the device is the worker's own choice unless the spec names one, and each token
    worker's nccl rendezvous store or tcp KV port takes a free port, so that several fit on one machine."""
    pool = getattr(spec.pools, role)
    kv = spec.kv_transfer
    settings = _shared(spec) + _engine(role, pool, in_cluster) + _simulated(spec, role, model_dir)
    if not pool.engine.chunked_prefill:
        settings.append(Setting("chunked_prefill", None))
    if not pool.engine.prefix_caching:
        settings.append(Setting("prefix_caching", None))
    settings += literal({"tensor_parallel": pool.tensor_parallel_size if pool.tensor_parallel_size > 1 else None})
    if not kv.layerwise:
        settings.append(Setting("layerwise", None))
    if in_cluster:  # the token side hosts the pair groups' store (nccl) or takes the KV bytes (tcp) on this port
        settings += literal({"nccl_port": kv.nccl.port if kv.backend == "nccl" else None,
                             "kv_tcp_port": kv.tcp.port if kv.backend == "tcp" else None,
                             "metrics_port": METRICS_PORT})
    return settings
