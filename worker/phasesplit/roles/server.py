"""`phasesplit worker --role prompt|token|mixed --model DIR ...`: one worker as a gRPC server.

Serves `Worker` plus `PromptWorker` (prompt, mixed) and/or `TokenWorker` (token, mixed) to the
callers the token allows (`phasesplit.auth`), at most as many calls at once as it has threads
(more are refused with RESOURCE_EXHAUSTED, not queued). The standard gRPC health service answers
on that port and, apart from the work's threads, on --health-port: "" (readiness: SERVING once
the model is loaded, NOT_SERVING while draining) and "liveness" (SERVING while the process runs).
SIGTERM or SIGINT drains: new work is refused with UNAVAILABLE, what is in flight finishes within
--drain-timeout, exit 0."""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from phasesplit import auth, logs
from phasesplit.grpc_auth import Guard
from phasesplit.control.worker_config import WorkerConfig
from phasesplit.engine.tokenizer import read_tokenizer_files
from phasesplit.heap import freeze_loaded_objects
from phasesplit.roles.command import main, parse_args  # noqa: F401 - also this module's
from phasesplit.roles.control import WorkerService
from phasesplit.roles.core import WorkerCore
from phasesplit.roles.engines import default_device, engine_kind, sending_transport
from phasesplit.roles.kv_inbox import KVInbox
from phasesplit.v1 import worker_pb2_grpc as pb_grpc

log = logging.getLogger("phasesplit.worker")
LIVENESS = "liveness"
SERVICES = {"prompt": ("phasesplit.v1.PromptWorker",), "token": ("phasesplit.v1.TokenWorker",),
            "mixed": ("phasesplit.v1.PromptWorker", "phasesplit.v1.TokenWorker")}


def load_engine(config: WorkerConfig, tp=None, device: str | None = None):
    return engine_kind(config).load(tp, device)


class WorkerServer:
    """The engine, its roles' services and the gRPC server around them."""

    def __init__(self, engine, config: WorkerConfig, transport=None):
        kind = engine_kind(config)
        self.settings = dataclasses.replace(config, served_model_name=config.served_model_name or engine.layout.model)
        self.core = WorkerCore(engine, self.settings)
        self.transport = transport
        self.inbox = KVInbox(self.core, config.kv_transfer_timeout, config.kv_lease)
        self.health = health.HealthServicer()
        self.server = work_server(config, "grpc")
        self.health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
                                         maximum_concurrent_rpcs=16)
        aborts = []
        self.prompt = None
        self.kv_receiver = None
        if config.role in ("prompt", "mixed"):
            from phasesplit.roles.prompt import PromptService
            self.transport = transport or kind.kv_sender(engine)
            self.prompt = PromptService(self.core, self.transport)
            pb_grpc.add_PromptWorkerServicer_to_server(self.prompt, self.server)
            aborts.append(self.prompt.abort)
        if config.role in ("token", "mixed"):
            from phasesplit.roles.token import TokenService, add_generate_to_server
            kind.push_receiver(self.inbox, self.core.tracked).add_to_server(self.server)
            add_generate_to_server(TokenService(self.core, self.inbox), self.server)
            aborts.append(self.inbox.abort)
            self.kv_receiver = kind.backend_receiver(self.inbox, engine)
            if self.kv_receiver is not None:
                self.kv_receiver.add_to_server(self.server)
        tokenizer = read_tokenizer_files(config.model)
        kv_aborts = [self.inbox.abort] if config.role in ("token", "mixed") else []
        pb_grpc.add_WorkerServicer_to_server(WorkerService(self.core, aborts, self.inbox.pending, tokenizer,
                                                           kv_aborts), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        self.port = self.server.add_insecure_port(listen_address(config.host, config.port))
        if not self.port:
            raise OSError(f"--port: cannot listen on {config.host}:{config.port}")
        self.health_port = self.health_server.add_insecure_port(listen_address(config.host, config.health_port))
        if not self.health_port:
            raise OSError(f"--health-port: cannot listen on {config.host}:{config.health_port}")
        self.core.on_drain.append(self._not_serving)
        self.metrics = None   # the /metrics HTTP server, with --metrics-port

    def start(self) -> "WorkerServer":
        self.core.loop.start()
        self.inbox.start()
        self.server.start()
        self.health_server.start()
        self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        if self.settings.metrics_port:
            from phasesplit.roles.metrics import serve_metrics
            self.metrics = serve_metrics(self.core, self.settings.host, self.settings.metrics_port)
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
        self.health_server.stop(grace=None)
        if self.metrics is not None:
            self.metrics.shutdown()
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


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def work_server(config: WorkerConfig, thread_name: str) -> grpc.Server:
    """The server of the work's RPCs: as many at once as it has threads, only from callers the token allows."""
    from phasesplit.transport import channels
    threads = config.grpc_threads or 2 * config.max_num_seqs + 16
    return grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=thread_name),
                       options=list(channels.SERVER_OPTIONS), maximum_concurrent_rpcs=threads,
                       interceptors=[Guard(auth.worker_token())])


def run(config: WorkerConfig) -> int:
    """The worker, once `phasesplit.roles.command` has read its command line and set up logging."""
    if auth.worker_token() is None:
        log.warning("no %s (or %s): this worker takes RPCs from anyone who can reach its port",
                    auth.TOKEN_ENV, auth.TOKEN_FILE_ENV)
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
        group = RankGroup(config.tensor_parallel, serve_rank, (config, logs.configured()),
                          config.device or default_device())
    except (OSError, ValueError) as exc:
        print(f"phasesplit worker: --tensor-parallel: {exc}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: group.terminate())
    code = group.start().wait()
    log.info("tensor-parallel worker exited with %d", code)
    return code


def serve_rank(tp, device: str, config: WorkerConfig, logging_settings: tuple[str, str, str]) -> int:
    component, level, fmt = logging_settings
    logs.configure(f"{component}-rank{tp.rank}", level, fmt)   # a spawned rank starts with no handlers
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
        from phasesplit.engine.cpu_threads import size_torch_threads
        log.info("loading model %s (weights, then the KV cache; %d torch CPU threads)", config.model,
                 size_torch_threads(config.tensor_parallel))
        engine = load_engine(config, tp, device)
        freeze_loaded_objects()
        if not leader:
            from phasesplit.roles.follower import follow
            follow(engine, config, sending_transport)
            return 0
        server = WorkerServer(engine, config)
        log.info("%s worker serving %s on %s:%d, health on port %d (%d KV blocks of %d tokens, device %s, "
                 "tensor parallel %d)", config.role, server.settings.served_model_name, config.host, server.port,
                 server.health_port, engine.num_total_blocks, engine.layout.block_size, engine.device, engine.tp.size)
        server.start()  # SERVING from here on: local mode reads the line above once it sees SERVING
    except (OSError, ValueError) as exc:
        print(f"phasesplit worker: {exc}", file=sys.stderr)
        return 2
    while not stop.wait(1.0):
        pass
    log.info("draining (up to %g s)", config.drain_timeout)
    finished = server.drain_and_stop()
    engine.close()
    log.info("stopped%s", "" if finished else ": drain timeout, in-flight requests were cut off")
    return 0


if __name__ == "__main__":
    sys.exit(main())
