"""`--engine`: the engine a worker runs and the KV handoff that goes with it, chosen in one place.

`torch` runs the model and moves its KV over `--kv-backend`; `sim` (`phasesplit.fleet.sim_engine`)
times each iteration by the performance model and hands the KV off through `fleet.sim_handoff`,
whatever the backend. Each imports its modules only once chosen."""

from __future__ import annotations

from dataclasses import dataclass

from phasesplit.control.worker_config import WorkerConfig
from phasesplit.transport.backends import PUSH


def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def sending_transport(backend: str, timeout: float, device="cpu"):
    from phasesplit import transport
    options = {} if backend == PUSH else {"device": device}  # the others send from the cache's device
    return transport.make_transport(backend, timeout=timeout, **options)


@dataclass(frozen=True, slots=True)
class TorchEngine:
    config: WorkerConfig

    def load(self, tp=None, device: str | None = None):
        from phasesplit.engine.engine import LLMEngine
        from phasesplit.engine.parallel import TensorParallel
        return LLMEngine(self.config.engine_config(device or self.config.device or default_device()),
                         tp or TensorParallel())

    def kv_sender(self, engine):
        return sending_transport(self.config.kv_backend, self.config.kv_transfer_timeout, engine.device)

    def push_receiver(self, inbox, track):
        """The token worker's PushKV (every token worker takes gRPC pushes, whatever --kv-backend)."""
        from phasesplit.transport import make_receiver
        return make_receiver(PUSH, inbox, layout=None, timeout=self.config.kv_transfer_timeout, track=track)

    def backend_receiver(self, inbox, engine):
        """What the token worker adds to its server for `--kv-backend`; None for grpc (PushKV, always served)."""
        config = self.config
        if config.kv_backend == PUSH:
            return None
        from phasesplit.transport import make_receiver
        return make_receiver(config.kv_backend, inbox, layout=engine.layout, device=engine.device,
                             timeout=config.kv_transfer_timeout, port=config.kv_port, host=config.host)


@dataclass(frozen=True, slots=True)
class SimulatedEngine:
    config: WorkerConfig

    def load(self, tp=None, device: str | None = None):
        from phasesplit.fleet import sim_engine
        return sim_engine.load(self.config)

    def kv_sender(self, engine):
        from phasesplit.fleet.sim_handoff import SimHandoff
        return SimHandoff(engine, self.config.kv_transfer_timeout)

    def push_receiver(self, inbox, track):
        from phasesplit.fleet.sim_handoff import SimReceiver
        return SimReceiver(inbox, timeout=self.config.kv_transfer_timeout, track=track)

    def backend_receiver(self, inbox, engine):
        return None


def engine_kind(config: WorkerConfig) -> TorchEngine | SimulatedEngine:
    return SimulatedEngine(config) if config.engine == "sim" else TorchEngine(config)
