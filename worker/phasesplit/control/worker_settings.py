"""What a pool's workers are told, from the spec: one typed list of `phasesplit worker` settings.

The operator renders it as a ConfigMap (each setting's `key`) and `$(KEY)` references in the
container's arguments; local mode renders the same list as literal flags.
"""

from __future__ import annotations

from dataclasses import dataclass

from phasesplit.control import spec as si


@dataclass(frozen=True, slots=True)
class Setting:
    flag: str                # the `phasesplit worker` flag
    value: str | None        # None: a switch without a value
    key: str | None = None   # the ConfigMap key that carries the value; None: passed as it is

    def literal(self) -> list[str]:
        return [self.flag] if self.value is None else [self.flag, self.value]

    def reference(self) -> list[str]:
        return [self.flag, f"$({self.key})"] if self.key else self.literal()


def number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _shared(spec: si.SplitInferenceSpec) -> list[Setting]:
    kv = spec.kv_transfer
    out = [Setting("--dtype", spec.model.dtype, "DTYPE"), Setting("--kv-backend", kv.backend, "KV_BACKEND"),
           Setting("--kv-transfer-timeout", number(kv.timeout_seconds), "KV_TRANSFER_TIMEOUT"),
           Setting("--kv-lease", number(kv.lease_seconds), "KV_LEASE")]
    if spec.model.max_model_len:
        out.append(Setting("--max-model-len", str(spec.model.max_model_len), "MAX_MODEL_LEN"))
    return out


def _engine(role: str, pool: si.Pool, in_cluster: bool) -> list[Setting]:
    engine = pool.engine
    device = engine.device or (("cuda" if si.requests_gpu(pool.resources) else "cpu") if in_cluster else None)
    values = [("--max-num-batched-tokens", "MAX_NUM_BATCHED_TOKENS", engine.max_num_batched_tokens),
              ("--max-num-seqs", "MAX_NUM_SEQS", engine.max_num_seqs),
              ("--block-size", "BLOCK_SIZE", engine.block_size), ("--device", "DEVICE", device),
              ("--num-kv-blocks", "NUM_KV_BLOCKS", engine.num_kv_blocks),
              ("--kv-memory-fraction", "KV_MEMORY_FRACTION", engine.kv_memory_fraction)]
    return [Setting(flag, number(v) if isinstance(v, float) else str(v), f"{role.upper()}_{key}")
            for flag, key, v in values if v is not None]


def _simulated(spec: si.SplitInferenceSpec, role: str, model_dir: str) -> list[Setting]:
    if not spec.model.simulated:
        return []
    args = spec.model.simulated.worker_args(role, model_dir)
    return [Setting(flag, value) for flag, value in zip(args[::2], args[1::2])]


def worker_settings(spec: si.SplitInferenceSpec, role: str, model_dir: str, in_cluster: bool = True) -> list[Setting]:
    """The settings of one pool's workers (`model_dir`: where the workers find the model). `in_cluster=False`
    (local mode): the device is the worker's own choice unless the spec names one, and each token
    worker's nccl rendezvous store or tcp KV port takes a free port, so that several fit on one machine."""
    pool = getattr(spec.pools, role)
    settings = _shared(spec) + _engine(role, pool, in_cluster) + _simulated(spec, role, model_dir)
    if pool.tensor_parallel_size > 1:
        settings.append(Setting("--tensor-parallel", str(pool.tensor_parallel_size)))
    if not spec.kv_transfer.layerwise:
        settings.append(Setting("--no-layerwise", None))
    if in_cluster and spec.kv_transfer.backend == "nccl":  # the token side hosts the pair groups' store here
        settings.append(Setting("--nccl-port", str(spec.kv_transfer.nccl.port)))
    if in_cluster and spec.kv_transfer.backend == "tcp":  # the token side takes the KV bytes on this port
        settings.append(Setting("--kv-tcp-port", str(spec.kv_transfer.tcp.port)))
    return settings
