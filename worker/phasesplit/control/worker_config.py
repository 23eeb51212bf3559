"""`WorkerConfig`: every `phasesplit worker` setting, declared once (name, type, default, help).

The worker's command line (`build_parser`), the spec's defaults for the same settings, the
operator's ConfigMap keys and local mode's flags (`control.worker_settings`) are all derived from
these fields. The engine's own settings take their defaults from `EngineConfig`. Free of torch and
grpc: the operator imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field, fields

from phasesplit.engine.config import EngineConfig
from phasesplit.transport import backends

ROLES = ("prompt", "token", "mixed")
DTYPES = ("float32", "float16", "bfloat16")
ENGINES = ("torch", "sim")  # sim: iteration times from the performance model (phasesplit.fleet)
SIMULATED = "simulated engine (--engine sim)"  # the help group of the sim_* settings
_ENGINE_FIELDS = {f.name: f for f in fields(EngineConfig)}


def option(default=dataclasses.MISSING, help: str | None = None, *, engine: str | None = None, **argparse_options):
    """One setting; `engine`: the `EngineConfig` field whose default it takes. `argparse_options`:
    `choices`, `metavar` or `group` (the help section)."""
    if engine is not None:
        default = _ENGINE_FIELDS[engine].default
    return field(default=default, metadata={"help": help, **argparse_options})


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Everything one worker is started with (the command line, typed)."""
    role: str = option(help="prompt: the prompt phase; token: the token phase; mixed: both", choices=ROLES)
    model: str = option(help="Hugging Face model directory")
    served_model_name: str | None = option(None, "model name clients use (default: the directory's name)")
    host: str = option("0.0.0.0", "address to listen on")
    port: int = option(50051, "gRPC port, 0 for a free one; with --tensor-parallel N, rank r takes its KV "
                              "shard on port + r")
    health_port: int = option(0, "port of the gRPC health service, served apart from the work's threads "
                                 "(0: any free one)")
    dtype: str = option(engine="dtype", help="of the weights and the KV cache", choices=DTYPES)
    device: str | None = option(None, "torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    block_size: int = option(engine="block_size", help="tokens per KV block")
    num_kv_blocks: int | None = option(engine="num_kv_blocks", help="KV cache size in blocks "
                                       "(default: from --kv-memory-fraction)")
    kv_memory_fraction: float = option(engine="kv_memory_fraction", help="KV cache size as a share of the "
                                       "device memory free after loading the model")
    max_num_batched_tokens: int = option(engine="max_num_batched_tokens", help="token budget per step")
    chunked_prefill: bool = option(engine="chunked_prefill", help="run each prompt whole in one step instead of "
                                   "in chunks beside the running decodes (prefill-only prompts always run whole)")
    prefix_caching: bool = option(engine="prefix_caching", help="compute every prompt whole instead of reusing "
                                  "the KV of cached blocks that earlier requests computed for the same prefix")
    max_num_seqs: int = option(engine="max_num_seqs", help="largest batch")
    max_model_len: int | None = option(engine="max_model_len", help="longest prompt plus output, in tokens "
                                       "(default: the model's max_position_embeddings)")
    kv_backend: str = option(backends.PUSH, "how KV moves from prompt to token workers", choices=backends.NAMES)
    nccl_port: int = option(0, "token side of --kv-backend nccl: port of the process-group rendezvous store, "
                               "0 for any free one")
    kv_tcp_port: int = option(0, "token side of --kv-backend tcp: port the KV bytes arrive on, 0 for any free one")
    kv_transfer_timeout: float = option(backends.TIMEOUT, "seconds a transfer may stall")
    kv_lease: float = option(60.0, "seconds received KV waits for its Generate")
    layerwise: bool = option(True, "send the KV after the prompt phase instead of layer by layer during it")
    metrics_port: int = option(0, "port of the worker's own Prometheus /metrics (engine queue, batch, KV cache), "
                                  "0 for none")
    drain_timeout: float = option(60.0, "seconds to finish in-flight work on SIGTERM")
    grpc_threads: int | None = option(None, "gRPC handler threads (default: enough for --max-num-seqs)")
    tensor_parallel: int = option(1, "shard the model over N ranks: N processes, one per GPU (cuda) or N gloo "
                                     "ranks (cpu)", metavar="N")
    engine: str = option("torch", "torch: run the model; sim: time each iteration by the performance model",
                         choices=ENGINES, group=SIMULATED)
    sim_model: str = option("llama2-70b", "model name in the profile table", group=SIMULATED)
    sim_hardware: str = option("h100-80gb", "hardware name in the profile table", group=SIMULATED)
    sim_tp: int = option(8, "tensor-parallel size of the simulated instance", group=SIMULATED)
    sim_profiles: str | None = option(None, "profile table (default: the bundled one)", metavar="CSV",
                                      group=SIMULATED)
    sim_catalog: str | None = option(None, "machine catalog (default: the bundled one)", metavar="FILE",
                                     group=SIMULATED)
    sim_time_scale: float = option(1.0, "every modelled time is multiplied by this (e.g. 10: ten times slower "
                                        "than modelled)", group=SIMULATED)

    def __post_init__(self):
        for name in ("kv_transfer_timeout", "kv_lease", "drain_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{flag(name)}: must be > 0 seconds, got {getattr(self, name)}")
        if self.tensor_parallel < 1:
            raise ValueError(f"{flag('tensor_parallel')}: must be >= 1, got {self.tensor_parallel}")

    @property
    def kv_port(self) -> int:
        """The token side's data port of its --kv-backend (0: any free one, or a backend without one)."""
        return {"nccl": self.nccl_port, "tcp": self.kv_tcp_port}.get(self.kv_backend, 0)

    def engine_config(self, device: str) -> EngineConfig:
        """The engine's share of these settings."""
        shared = {name: getattr(self, name) for name in _ENGINE_FIELDS if name in FIELDS}
        return EngineConfig(**{**shared, "model_dir": self.model, "device": device})


FIELDS = {f.name: f for f in fields(WorkerConfig)}


def default(name: str):
    """The declared default of a setting (for the spec and local mode, which pass it on)."""
    return FIELDS[name].default


def flag(name: str) -> str:
    """The command-line flag of a setting; a switch that is on by default is turned off by `--no-NAME`."""
    prefix = "--no-" if FIELDS[name].default is True else "--"
    return prefix + name.replace("_", "-")


def build_parser(**parser_options) -> argparse.ArgumentParser:
    """One flag per field; flags left out are absent from the result, so the fields' defaults apply."""
    p = argparse.ArgumentParser(argument_default=argparse.SUPPRESS, **parser_options)
    groups = {}
    hints = typing.get_type_hints(WorkerConfig)
    for f in fields(WorkerConfig):
        options = dict(f.metadata)
        group = options.pop("group", None)
        if group and group not in groups:
            groups[group] = p.add_argument_group(group)
        target = groups[group] if group else p
        target.add_argument(flag(f.name), dest=f.name, **{**options, **_kind(f, hints[f.name])})
    return p


def _kind(f: dataclasses.Field, hint) -> dict:
    """How argparse takes the value: required, a switch, or typed with its default shown in the help."""
    if f.default is dataclasses.MISSING:
        return {"required": True}
    if f.default is True:
        return {"action": "store_false"}
    options = {"type": next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))}
    if f.default is not None and f.metadata.get("help"):
        options["help"] = f"{f.metadata['help']} (default: {_shown(f.default)})"
    return options


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
