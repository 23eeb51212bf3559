"""One request's engine outputs as a stream of TokenEvents (token and mixed roles)."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

import grpc

from phasesplit.engine.engine import KVCapacityError
from phasesplit.roles.core import WorkerCore
from phasesplit.roles.engine_loop import Finished
from phasesplit.v1 import worker_pb2 as pb


def submit_or_abort(core: WorkerCore, context: grpc.ServicerContext, request_id: str,
                    on_output: Callable, add: Callable) -> None:
    """Adds a request on the engine thread; bad input ends the RPC with INVALID_ARGUMENT."""
    try:
        core.loop.submit(request_id, on_output, add).result()
    except ValueError as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except KVCapacityError as exc:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))


def stream_tokens(core: WorkerCore, context: grpc.ServicerContext, request_id: str,
                  add: Callable) -> Iterator[pb.TokenEvent]:
    """Runs add() on the engine thread, then yields a TokenEvent per output until the request ends.
    A client that goes away aborts the request."""
    outputs: queue.SimpleQueue = queue.SimpleQueue()
    submit_or_abort(core, context, request_id, outputs.put, add)
    done = False
    ended: list[str] = []   # how the stream ended, counted once (the RPC's end races the last output)
    ended_lock = threading.Lock()

    def end(how: str) -> None:
        with ended_lock:
            if ended:
                return
            ended.append(how)
        core.count_stream_end(how)

    def on_rpc_end():
        if not done:
            core.loop.abort(request_id)
            end("cancelled")

    if not context.add_callback(on_rpc_end):
        on_rpc_end()
    while True:
        out = outputs.get()
        if isinstance(out, Finished) and out.finish_reason == "error":
            done = True
            end("error")
            context.abort(grpc.StatusCode.INTERNAL, out.error)
        if out.finished:
            done = True
            end(out.finish_reason)
        yield pb.TokenEvent(token_ids=list(out.token_ids), text=out.text, finish_reason=out.finish_reason or "",
                            num_cached_tokens=out.num_cached_tokens)
        if out.finished:
            return
