"""KV transfer between prompt and token workers, behind one interface (gRPC, NCCL/gloo, TCP).

`make_transport(backend, **options)` builds the sending side by name (`--kv-backend`);
`make_receiver(backend, sink, ...)` the receiving side of a token worker: what it adds to the
worker's gRPC server (`add_to_server`) to take the backend's transfers into a `KVSink`. Every
token worker also takes gRPC pushes (`make_receiver("grpc", ...)`: TokenWorker.PushKV).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from phasesplit.transport.backends import BACKENDS, PUSH, TIMEOUT

if TYPE_CHECKING:  # importing the package stays free of torch: the spec reads `backends` through it
    from phasesplit.transport.base import KVReceiver, KVSink, KVTransport


def _load(backend: str, side: int):
    if backend not in BACKENDS:
        raise ValueError(f"kv backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    module, name = BACKENDS[backend][side].split(":")
    return getattr(importlib.import_module(f"phasesplit.transport.{module}"), name)


def make_transport(backend: str = PUSH, **options) -> KVTransport:
    return _load(backend, 0)(**options)


def make_receiver(backend: str, sink: KVSink, *, layout, device="cpu", timeout: float = TIMEOUT,
                  port: int = 0, **options) -> KVReceiver:
    """The receiving side of `backend` over `sink`; `port`: the backend's own listening port, if any
    (0: any free one); `options`: the backend's own (grpc: `track`, see `grpc_receive.PushKVReceiver`)."""
    if backend == PUSH:
        return _load(backend, 1)(sink, timeout=timeout, **options)
    return _load(backend, 1)(sink, layout, device, timeout=timeout, port=port, **options)
