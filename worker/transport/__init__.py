"""KV transfer between prompt and token workers, behind one interface (gRPC, NCCL/gloo).

`make_transport(backend, **options)` builds the sending side by name (`--kv-backend`). The
receiving side is a `KVSink`, served through `grpc_kv.handle_push_kv` (grpc) or
`nccl_receive.KVGroupService` (nccl: gRPC control, tensors over a process group; gloo on CPU).
"""

from __future__ import annotations

import importlib

from phasesplit.transport.base import KVTransport

# name -> "module:class"; a backend registers here and accepts keyword options.
BACKENDS = {
    "grpc": "phasesplit.transport.grpc_kv:GrpcKVTransport",
    "nccl": "phasesplit.transport.nccl_kv:NcclKVTransport",
}


def make_transport(backend: str = "grpc", **options) -> KVTransport:
    if backend not in BACKENDS:
        raise ValueError(f"kv backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    module, name = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(module), name)(**options)
