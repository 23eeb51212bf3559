"""A real gRPC token-worker-like server whose KVSink holds plain tensors (test fixture)."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import torch

from phasesplit.transport import make_receiver
from phasesplit.transport.base import CapacityError, TransferAborted, check_layout, num_prompt_blocks
from phasesplit.transport.blocks import CacheDestination
from phasesplit.transport.channels import SERVER_OPTIONS
from phasesplit.v1 import worker_pb2 as pb
from phasesplit.v1 import worker_pb2_grpc


def make_layout(dtype="float32", *, num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, model="tiny"):
    return pb.KVLayout(model=model, dtype=dtype, num_layers=num_layers, num_kv_heads=num_kv_heads,
                       head_dim=head_dim, block_size=block_size)


def make_header(layout, num_tokens, request_id="req-1"):
    return pb.KVHeader(request_id=request_id, layout=layout, prompt_token_ids=list(range(1, num_tokens + 1)),
                       first_token=7)


def make_cache(layout, num_blocks, *, seed=0, device="cpu"):
    """[num_layers] lists of K and V caches filled with random values."""
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, layout.dtype)
    shape = (num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
    k = [torch.randn(shape, generator=gen).to(dtype).to(device) for _ in range(layout.num_layers)]
    v = [torch.randn(shape, generator=gen).to(dtype).to(device) for _ in range(layout.num_layers)]
    return k, v


SENDER_BLOCKS = [9, 2, 3, 4, 17, 0, 11, 12, 13, 5, 30, 31]  # runs and gaps


def send_all(sender, k, v, block_ids=SENDER_BLOCKS):
    for layer in range(len(k)):
        sender.send_layer(layer, k[layer], v[layer], block_ids)
    return sender.finish()


def assert_received(sink, k, v, block_ids, request_id="req-1"):
    """The blocks the sink committed for `request_id` hold the sent blocks' bytes (and are other blocks)."""
    dest_ids = sink.committed[request_id]
    assert dest_ids != block_ids[:len(dest_ids)]
    for layer in range(len(k)):
        for name, src, dst in (("k", k, sink.k), ("v", v, sink.v)):
            sent = src[layer][block_ids[:len(dest_ids)]].cpu().view(torch.uint8)
            got = dst[layer][dest_ids].cpu().view(torch.uint8)
            assert torch.equal(sent, got), f"layer {layer} {name} differs"


def eventually(predicate, timeout=7.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def all_free(sink, timeout=7.0):
    return eventually(lambda: sorted(sink.free) == list(range(sink.num_blocks)), timeout)


class TensorDestination(CacheDestination):
    def __init__(self, sink: TensorSink, request_id: str, block_ids: list[int]):
        self.sink, self.request_id, self.block_ids = sink, request_id, block_ids
        self.lock = threading.Lock()
        self.state = "open"
        self.writes = 0

    def cache(self, layer, kind):
        if self.state != "open":
            raise TransferAborted(f"write after {self.state}")
        self.sink.before_write(self)
        return (self.sink.k if kind == 0 else self.sink.v)[layer]

    def written(self):
        self.writes += 1

    def commit(self):
        assert self.state == "open"
        self.state = "committed"
        self.sink.committed[self.request_id] = self.block_ids

    def abort(self):
        if self.state == "open":
            self.state = "aborted"
            self.sink.aborted_at = time.monotonic()
            with self.sink.lock:
                self.sink.free.extend(self.block_ids)


class TensorSink:
    """Paged K/V caches as plain tensors; hands out blocks in a scrambled (non-contiguous) order."""

    def __init__(self, layout, num_blocks=64, device="cpu", share_layers=False):
        self.layout = layout
        self.device = device
        if share_layers:  # one tensor stands for every layer: for tests of many layers
            one = pb.KVLayout()
            one.CopyFrom(layout)
            one.num_layers = 1
            k, v = make_cache(one, num_blocks, seed=99, device=device)
            self.k, self.v = k * layout.num_layers, v * layout.num_layers
        else:
            self.k, self.v = make_cache(layout, num_blocks, seed=99, device=device)
        self.num_blocks = num_blocks
        self.free = list(range(num_blocks - 1, -1, -2)) + list(range(num_blocks - 2, -1, -2))
        self.lock = threading.Lock()
        self.destinations: list[TensorDestination] = []
        self.committed: dict[str, list[int]] = {}
        self.aborted_at: float | None = None
        self.gate = threading.Event()  # cleared: write() blocks (a slow token worker)
        self.gate.set()

    def begin(self, header):
        check_layout(self.layout, header.layout)
        needed = num_prompt_blocks(header)
        with self.lock:
            if needed > len(self.free):
                raise CapacityError(f"need {needed} KV blocks, {len(self.free)} free")
            ids, self.free = self.free[:needed], self.free[needed:]
        dest = TensorDestination(self, header.request_id, ids)
        self.destinations.append(dest)
        return dest

    def before_write(self, dest):
        self.gate.wait()


class KVServicer(worker_pb2_grpc.TokenWorkerServicer):
    def __init__(self, sink, timeout):
        self.receiver = make_receiver("grpc", sink, layout=sink.layout, timeout=timeout)

    def PushKV(self, request_iterator, context):
        return self.receiver.push_kv(request_iterator, context)


class ReceiverServer:
    """A token-worker-like gRPC server with a backend's receiving side (`make_receiver`) over `sink`."""

    def __init__(self, sink, backend, *, timeout=10.0, port=None):
        self.sink = sink
        self.service = make_receiver(backend, sink, layout=sink.layout, device=sink.device, timeout=timeout)
        self.executor = futures.ThreadPoolExecutor(max_workers=8)
        self.server = grpc.server(self.executor)
        self.service.add_to_server(self.server)
        self.addr = f"127.0.0.1:{self.server.add_insecure_port(f'127.0.0.1:{port or 0}')}"
        self.server.start()

    def stop(self):
        self.sink.gate.set()
        self.server.stop(None).wait()
        self.service.close()
        self.executor.shutdown(wait=True)


class KVServer:
    def __init__(self, sink, *, timeout=10.0, generated_registration=False):
        self.sink = sink
        self.executor = futures.ThreadPoolExecutor(max_workers=4)
        self.server = grpc.server(self.executor, options=SERVER_OPTIONS)
        servicer = KVServicer(sink, timeout)
        if generated_registration:  # PushKV takes parsed KVChunk messages
            worker_pb2_grpc.add_TokenWorkerServicer_to_server(servicer, self.server)
        else:
            servicer.receiver.add_to_server(self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.addr = f"127.0.0.1:{self.port}"
        self.server.start()

    def stop(self):
        self.sink.gate.set()
        self.server.stop(None).wait()
        self.executor.shutdown(wait=True)


