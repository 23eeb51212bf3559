"""The life of a tensor-parallel worker's rank r > 0: follow rank 0's engine, and move this rank's KV shard.

A prompt (or mixed) rank sends its shard of each transfer rank 0 opens (`shard_send`). A token (or
mixed) rank takes its shard on its own gRPC server at the worker's port + r, with the worker's KV
backend (`shard_receive`; an nccl or tcp data port, when set, is likewise the worker's + r).
Health, Generate and everything else stay with rank 0.
"""

from __future__ import annotations

import logging

import grpc

from phasesplit.roles.server import listen_address, work_server
from phasesplit.roles.shard_receive import ShardInbox
from phasesplit.roles.shard_send import ShardSenders
from phasesplit.roles.token import add_generate_to_server
from phasesplit.transport import make_receiver
from phasesplit.transport.backends import PUSH

log = logging.getLogger(__name__)


class ShardKVService:
    """TokenWorker.Generate on a follower rank, refused: it belongs to rank 0 (PushKV takes the rank's shard)."""

    def Generate(self, request, context):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                      "this port takes a tensor-parallel rank's KV shard; call Generate on the worker's port")


def follow(engine, config, sending_transport) -> None:
    """Until rank 0 closes the engine (`config`: the worker's `roles.server.WorkerConfig`)."""
    rank = engine.tp.rank
    transport = server = receiver = None
    handlers = []  # what takes rank 0's messages on this rank
    if config.role in ("prompt", "mixed"):
        transport = sending_transport(config.kv_backend, config.kv_transfer_timeout, engine.device)
        handlers.append(ShardSenders(engine, transport))
    if config.role in ("token", "mixed"):
        inbox = ShardInbox(engine, config.kv_transfer_timeout, config.kv_lease)
        handlers.append(inbox)
        server = work_server(config, f"rank{rank}-grpc")
        make_receiver(PUSH, inbox, layout=engine.layout, timeout=config.kv_transfer_timeout).add_to_server(server)
        add_generate_to_server(ShardKVService(), server)
        if config.kv_backend != PUSH:
            port = config.kv_port
            receiver = make_receiver(config.kv_backend, inbox, layout=engine.layout, device=engine.device,
                                     timeout=config.kv_transfer_timeout, port=port + rank if port else 0,
                                     host=config.host)
            receiver.add_to_server(server)
        if not server.add_insecure_port(listen_address(config.host, config.port + rank)):
            raise OSError(f"--port: rank {rank} takes its KV shard on {config.host}:{config.port + rank}, "
                          "which is not free")
        server.start()
        log.info("rank %d takes its KV shard on %s:%d", rank, config.host, config.port + rank)
    try:
        engine.follow(_to_each(handlers))
    finally:
        if server is not None:
            server.stop(grace=1.0).wait()
        for part in (receiver, transport):
            if part is not None:
                part.close()


def _to_each(handlers: list):
    """Hands each of rank 0's messages to every handler; each takes only its own kinds."""
    def on_message(message) -> None:
        for handler in handlers:
            handler.on_message(message)
    return on_message
