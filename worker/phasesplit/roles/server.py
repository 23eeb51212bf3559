"""`phasesplit worker --role prompt|token|mixed --model DIR ...`: one worker as a gRPC server.

Serves `Worker` plus `PromptWorker` (prompt, mixed) and/or `TokenWorker` (token, mixed), and the
standard gRPC health service (SERVING once the model is loaded). SIGTERM or SIGINT drains: new
work is refused with UNAVAILABLE, what is in flight finishes within --drain-timeout, exit 0."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from phasesplit.engine.tokenizer import read_tokenizer_files
from phasesplit.heap import freeze_loaded_objects
from phasesplit.roles.control import WorkerService
from phasesplit.roles.core import WorkerCore, WorkerSettings
from phasesplit.roles.kv_inbox import KVInbox
from phasesplit.v1 import worker_pb2_grpc as pb_grpc

log = logging.getLogger("phasesplit.worker")
ROLES = ("prompt", "token", "mixed")
SERVICES = {"prompt": ("phasesplit.v1.PromptWorker",), "token": ("phasesplit.v1.TokenWorker",),
            "mixed": ("phasesplit.v1.PromptWorker", "phasesplit.v1.TokenWorker")}


def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Everything one worker is started with (the command line, typed)."""
    role: str
    model: str
    served_model_name: str | None = None
    host: str = "0.0.0.0"
    port: int = 50051
    dtype: str = "float32"
    device: str | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_memory_fraction: float = 0.8
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_model_len: int | None = None
    kv_backend: str = "grpc"
    nccl_port: int = 0
    kv_transfer_timeout: float = 30.0
    kv_lease: float = 30.0
    layerwise: bool = True
    drain_timeout: float = 30.0
    grpc_threads: int | None = None
    kv_tcp_port: int = 0
    tensor_parallel: int = 1
    engine: str = "torch"          # sim: iteration times from the performance model (phasesplit.fleet)
    sim_model: str = "llama2-70b"
    sim_hardware: str = "h100-80gb"
    sim_tp: int = 8
    sim_profiles: str | None = None
    sim_catalog: str | None = None
    sim_time_scale: float = 1.0

    def __post_init__(self):
        for name in ("kv_transfer_timeout", "kv_lease", "drain_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')}: must be > 0 seconds, got {getattr(self, name)}")
        if self.tensor_parallel < 1:
            raise ValueError(f"--tensor-parallel: must be >= 1, got {self.tensor_parallel}")


def parse_args(argv: list[str]) -> WorkerConfig:
    """The command line as a `WorkerConfig`; flags left out take the config's defaults."""
    p = argparse.ArgumentParser(prog="phasesplit worker", description=__doc__.split("\n\n")[0],
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--served-model-name", help="model name clients use (default: the directory's name)")
    p.add_argument("--host", help="address to listen on (default: 0.0.0.0)")
    p.add_argument("--port", type=int, help="gRPC port (default: 50051; 0 picks a free one); with --tensor-parallel N, "
                   "rank r takes its KV shard on port + r")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: float32")
    p.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--block-size", type=int, help="tokens per KV block (default: 16)")
    p.add_argument("--num-kv-blocks", type=int)
    p.add_argument("--kv-memory-fraction", type=float, help="default: 0.8")
    p.add_argument("--max-num-batched-tokens", type=int, help="default: 2048")
    p.add_argument("--max-num-seqs", type=int, help="default: 64")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--kv-backend", choices=("grpc", "nccl", "tcp"), help="default: grpc")
    p.add_argument("--nccl-port", type=int,
                   help="token side of --kv-backend nccl: port of the process-group rendezvous store (0: any free port)")
    p.add_argument("--kv-tcp-port", type=int,
                   help="token side of --kv-backend tcp: port the KV bytes arrive on (0: any free port)")
    p.add_argument("--kv-transfer-timeout", type=float, help="seconds a transfer may stall (default: 30)")
    p.add_argument("--kv-lease", type=float, help="seconds received KV waits for its Generate (default: 30)")
    p.add_argument("--no-layerwise", dest="layerwise", action="store_false",
                   help="send the KV after the prompt phase instead of layer by layer during it")
    p.add_argument("--drain-timeout", type=float, help="seconds to finish in-flight work on SIGTERM (default: 30)")
    p.add_argument("--grpc-threads", type=int, help="gRPC handler threads (default: enough for --max-num-seqs)")
    p.add_argument("--tensor-parallel", type=int, metavar="N",
                   help="shard the model over N ranks: N processes, one per GPU (cuda) or N gloo ranks (cpu)")
    from phasesplit.fleet import sim_engine
    sim_engine.add_arguments(p)
    try:
        return WorkerConfig(**vars(p.parse_args(argv)))
    except ValueError as e:
        p.error(str(e))


def sending_transport(backend: str, timeout: float, device="cpu"):
    from phasesplit import transport
    options = {"device": device} if backend in ("nccl", "tcp") else {}  # they send from the cache's device
    return transport.make_transport(backend, timeout=timeout, **options)


def load_engine(config: WorkerConfig, tp=None, device: str | None = None):
    if config.engine == "sim":
        from phasesplit.fleet import sim_engine
        return sim_engine.load(config)
    from phasesplit.engine.engine import EngineConfig, LLMEngine
    from phasesplit.engine.parallel import TensorParallel
    return LLMEngine(EngineConfig(
        model_dir=config.model, dtype=config.dtype, device=device or config.device or default_device(),
        block_size=config.block_size, num_kv_blocks=config.num_kv_blocks, kv_memory_fraction=config.kv_memory_fraction,
        max_num_batched_tokens=config.max_num_batched_tokens, max_num_seqs=config.max_num_seqs,
        max_model_len=config.max_model_len, served_model_name=config.served_model_name), tp or TensorParallel())


class WorkerServer:
    """The engine, its roles' services and the gRPC server around them."""

    def __init__(self, engine, config: WorkerConfig, transport=None):
        from phasesplit.transport import channels, make_receiver
        name = config.served_model_name or engine.layout.model
        self.settings = WorkerSettings(role=config.role, served_model_name=name,
                                       kv_transfer_timeout=config.kv_transfer_timeout, kv_lease=config.kv_lease,
                                       drain_timeout=config.drain_timeout, layerwise=config.layerwise)
        self.core = WorkerCore(engine, self.settings)
        self.transport = transport
        self.inbox = KVInbox(self.core, config.kv_transfer_timeout, config.kv_lease)
        self.health = health.HealthServicer()
        threads = config.grpc_threads or 2 * config.max_num_seqs + 16
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"),
                                  options=list(channels.SERVER_OPTIONS))
        aborts = []
        simulated = config.engine == "sim"
        self.prompt = None
        self.kv_receiver = None
        if config.role in ("prompt", "mixed"):
            from phasesplit.fleet.sim_handoff import SimHandoff
            from phasesplit.roles.prompt import PromptService
            self.transport = transport or (SimHandoff(engine, config.kv_transfer_timeout) if simulated else
                                           sending_transport(config.kv_backend, config.kv_transfer_timeout, engine.device))
            self.prompt = PromptService(self.core, self.transport)
            pb_grpc.add_PromptWorkerServicer_to_server(self.prompt, self.server)
            aborts.append(self.prompt.abort)
        if config.role in ("token", "mixed"):
            from phasesplit.fleet.sim_handoff import SimReceiver
            from phasesplit.roles.token import TokenService, add_generate_to_server
            push = SimReceiver(self.inbox, timeout=config.kv_transfer_timeout, track=self.core.tracked) if simulated \
                else make_receiver("grpc", self.inbox, layout=engine.layout, timeout=config.kv_transfer_timeout,
                                   track=self.core.tracked)
            push.add_to_server(self.server)
            add_generate_to_server(TokenService(self.core, self.inbox), self.server)
            aborts.append(self.inbox.abort)
            backend = config.kv_backend
            if backend != "grpc" and not simulated:  # PushKV (grpc) is served by every token worker
                port = config.nccl_port if backend == "nccl" else config.kv_tcp_port
                self.kv_receiver = make_receiver(backend, self.inbox, layout=engine.layout, device=engine.device,
                                               timeout=config.kv_transfer_timeout, port=port)
                self.kv_receiver.add_to_server(self.server)
        tokenizer = read_tokenizer_files(config.model)
        pb_grpc.add_WorkerServicer_to_server(WorkerService(self.core, aborts, self.inbox.pending, tokenizer),
                                             self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(f"{config.host}:{config.port}")
        if not self.port:
            raise OSError(f"--port: cannot listen on {config.host}:{config.port}")
        self.core.on_drain.append(self._not_serving)

    def start(self) -> "WorkerServer":
        self.core.loop.start()
        self.inbox.start()
        self.server.start()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        return self

    def drain_and_stop(self) -> bool:
        """Refuses new work, waits for in-flight requests (and KV awaiting Generate); True if all finished."""
        self.core.drain()
        finished = self.core.wait_idle(self.settings.drain_timeout, self.inbox.pending)
        self.stop()
        return finished

    def stop(self) -> None:
        self.server.stop(grace=1.0).wait()
        self.inbox.stop()
        self.core.loop.stop()
        if self.prompt is not None:
            self.prompt.close()
        if self.transport is not None:
            self.transport.close()
        if self.kv_receiver is not None:
            self.kv_receiver.close()

    def _not_serving(self) -> None:
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    def _set_health(self, status) -> None:
        for service in ("", "phasesplit.v1.Worker", *SERVICES[self.settings.role]):
            self.health.set(service, status)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {config.role} %(name)s %(levelname)s %(message)s")
    if config.tensor_parallel > 1:
        return supervise(config)
    return serve(config)


def supervise(config: WorkerConfig) -> int:
    """Starts the worker's tensor-parallel ranks and lives as long as all of them do: SIGTERM drains
    through rank 0; a rank that dies stops the others and makes the exit code nonzero."""
    from phasesplit.engine.config import ModelConfig
    from phasesplit.engine.parallel import check_tensor_parallel
    from phasesplit.engine.ranks import RankGroup
    try:
        check_tensor_parallel(ModelConfig.from_dir(config.model), config.tensor_parallel)
        group = RankGroup(config.tensor_parallel, serve_rank, (config,), config.device or default_device())
    except (OSError, ValueError) as exc:
        print(f"phasesplit worker: --tensor-parallel: {exc}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: group.terminate())
    code = group.start().wait()
    log.info("tensor-parallel worker exited with %d", code)
    return code


def serve_rank(tp, device: str, config: WorkerConfig) -> int:
    return serve(config, tp, device)


def serve(config: WorkerConfig, tp=None, device: str | None = None) -> int:
    """Rank 0 (the only rank without tensor parallelism) serves; the other ranks follow its engine."""
    leader = tp is None or tp.is_leader
    stop = threading.Event()
    if leader:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    try:
        from phasesplit.transport.malloc import tune_malloc
        tune_malloc()
    except ImportError:
        pass
    try:
        engine = load_engine(config, tp, device)
        freeze_loaded_objects()
        if not leader:
            from phasesplit.roles.follower import follow
            follow(engine, config, sending_transport)
            return 0
        server = WorkerServer(engine, config).start()
    except (OSError, ValueError) as exc:
        print(f"phasesplit worker: {exc}", file=sys.stderr)
        return 2
    log.info("%s worker serving %s on %s:%d (%d KV blocks of %d tokens, device %s, tensor parallel %d)", config.role,
             server.settings.served_model_name, config.host, server.port, engine.num_total_blocks,
             engine.layout.block_size, engine.device, engine.tp.size)
    while not stop.wait(1.0):
        pass
    log.info("draining (up to %g s)", config.drain_timeout)
    finished = server.drain_and_stop()
    engine.close()
    log.info("stopped%s", "" if finished else ": drain timeout, in-flight requests were cut off")
    return 0


if __name__ == "__main__":
    sys.exit(main())
