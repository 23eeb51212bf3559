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

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

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


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="phasesplit worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--served-model-name", help="model name clients use (default: the directory's name)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=50051,
                   help="gRPC port; with --tensor-parallel N, rank r takes its KV shard on port + r")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int)
    p.add_argument("--kv-memory-fraction", type=float, default=0.8)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--kv-backend", default="grpc", choices=("grpc", "nccl", "tcp"))
    p.add_argument("--nccl-port", type=int, default=0,
                   help="token side of --kv-backend nccl: port of the process-group rendezvous store (0: any free port)")
    p.add_argument("--kv-tcp-port", type=int, default=0,
                   help="token side of --kv-backend tcp: port the KV bytes arrive on (0: any free port)")
    p.add_argument("--kv-transfer-timeout", type=float, default=30.0, help="seconds a transfer may stall")
    p.add_argument("--kv-lease", type=float, default=30.0, help="seconds received KV waits for its Generate")
    p.add_argument("--no-layerwise", dest="layerwise", action="store_false",
                   help="send the KV after the prompt phase instead of layer by layer during it")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish in-flight work on SIGTERM")
    p.add_argument("--grpc-threads", type=int, help="gRPC handler threads (default: enough for --max-num-seqs)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="shard the model over N ranks: N processes, one per GPU (cuda) or N gloo ranks (cpu)")
    args = p.parse_args(argv)
    if args.tensor_parallel < 1:
        p.error(f"--tensor-parallel: must be >= 1, got {args.tensor_parallel}")
    for name in ("kv_transfer_timeout", "kv_lease", "drain_timeout"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')}: must be > 0 seconds, got {getattr(args, name)}")
    return args


def sending_transport(backend: str, timeout: float, device="cpu"):
    from phasesplit import transport
    options = {"device": device} if backend in ("nccl", "tcp") else {}  # they send from the cache's device
    return transport.make_transport(backend, timeout=timeout, **options)


def load_engine(args: argparse.Namespace, tp=None, device: str | None = None):
    from phasesplit.engine.engine import EngineConfig, LLMEngine
    from phasesplit.engine.parallel import TensorParallel
    return LLMEngine(EngineConfig(
        model_dir=args.model, dtype=args.dtype, device=device or args.device or default_device(),
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks, kv_memory_fraction=args.kv_memory_fraction,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, served_model_name=args.served_model_name), tp or TensorParallel())


class WorkerServer:
    """The engine, its roles' services and the gRPC server around them."""

    def __init__(self, engine, args: argparse.Namespace, transport=None):
        from phasesplit.transport import channels, grpc_kv, make_receiver
        name = args.served_model_name or engine.layout.model
        self.settings = WorkerSettings(role=args.role, served_model_name=name,
                                       kv_transfer_timeout=args.kv_transfer_timeout, kv_lease=args.kv_lease,
                                       drain_timeout=args.drain_timeout, layerwise=args.layerwise)
        self.core = WorkerCore(engine, self.settings)
        self.transport = transport
        self.inbox = KVInbox(self.core, args.kv_transfer_timeout, args.kv_lease)
        self.health = health.HealthServicer()
        threads = args.grpc_threads or 2 * args.max_num_seqs + 16
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"),
                                  options=list(channels.SERVER_OPTIONS))
        aborts = []
        self.prompt = None
        self.kv_receiver = None
        if args.role in ("prompt", "mixed"):
            from phasesplit.roles.prompt import PromptService
            self.transport = transport or sending_transport(args.kv_backend, args.kv_transfer_timeout, engine.device)
            self.prompt = PromptService(self.core, self.transport)
            pb_grpc.add_PromptWorkerServicer_to_server(self.prompt, self.server)
            aborts.append(self.prompt.abort)
        if args.role in ("token", "mixed"):
            from phasesplit.roles.token import TokenService
            grpc_kv.add_token_worker_to_server(TokenService(self.core, self.inbox), self.server)
            aborts.append(self.inbox.abort)
            backend = getattr(args, "kv_backend", "grpc")
            if backend != "grpc":  # PushKV (grpc) is served by every token worker
                port = getattr(args, "nccl_port" if backend == "nccl" else "kv_tcp_port", 0)
                self.kv_receiver = make_receiver(backend, self.inbox, layout=engine.layout, device=engine.device,
                                               timeout=args.kv_transfer_timeout, port=port)
                self.kv_receiver.add_to_server(self.server)
        pb_grpc.add_WorkerServicer_to_server(WorkerService(self.core, aborts, self.inbox.pending), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(f"{args.host}:{args.port}")
        if not self.port:
            raise OSError(f"--port: cannot listen on {args.host}:{args.port}")
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
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.role} %(name)s %(levelname)s %(message)s")
    if args.tensor_parallel > 1:
        return supervise(args)
    return serve(args)


def supervise(args: argparse.Namespace) -> int:
    """Starts the worker's tensor-parallel ranks and lives as long as all of them do: SIGTERM drains
    through rank 0; a rank that dies stops the others and makes the exit code nonzero."""
    from phasesplit.engine.config import ModelConfig
    from phasesplit.engine.parallel import check_tensor_parallel
    from phasesplit.engine.ranks import RankGroup
    try:
        check_tensor_parallel(ModelConfig.from_dir(args.model), args.tensor_parallel)
        group = RankGroup(args.tensor_parallel, serve_rank, (args,), args.device or default_device())
    except (OSError, ValueError) as exc:
        print(f"phasesplit worker: --tensor-parallel: {exc}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: group.terminate())
    code = group.start().wait()
    log.info("tensor-parallel worker exited with %d", code)
    return code


def serve_rank(tp, device: str, args: argparse.Namespace) -> int:
    return serve(args, tp, device)


def serve(args: argparse.Namespace, tp=None, device: str | None = None) -> int:
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
        engine = load_engine(args, tp, device)
        if not leader:
            from phasesplit.roles.follower import follow
            follow(engine, args, sending_transport)
            return 0
        server = WorkerServer(engine, args).start()
    except (OSError, ValueError) as exc:
        print(f"phasesplit worker: {exc}", file=sys.stderr)
        return 2
    log.info("%s worker serving %s on %s:%d (%d KV blocks of %d tokens, device %s, tensor parallel %d)", args.role,
             server.settings.served_model_name, args.host, server.port, engine.num_total_blocks,
             engine.layout.block_size, engine.device, engine.tp.size)
    while not stop.wait(1.0):
        pass
    log.info("draining (up to %g s)", args.drain_timeout)
    finished = server.drain_and_stop()
    engine.close()
    log.info("stopped%s", "" if finished else ": drain timeout, in-flight requests were cut off")
    return 0


if __name__ == "__main__":
    sys.exit(main())
