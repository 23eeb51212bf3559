"""KV over a process group (gloo on CPU; the NCCL backend runs the same code on CUDA), gRPC as control.

Both ranks of each pair group live in this process (a real TCPStore and real gloo sockets on
127.0.0.1); the token side is a real gRPC server with the KVGroup service over a TensorSink."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
import torch

from phasesplit.transport.base import (
    CapacityError, KVDataLoss, LayoutMismatch, TransferAborted, TransferError, block_bytes,
)
from phasesplit.transport.nccl_kv import NcclKVTransport
from phasesplit.transport.nccl_receive import KVGroupService
from phasesplit.v1 import worker_pb2_grpc

from support.kv_sink import TensorSink, make_cache, make_header, make_layout

SENDER_BLOCKS = [9, 2, 3, 4, 17, 0, 11, 12, 13, 5, 30, 31]
TIMEOUT = 5.0


class GroupServer:
    """A token-worker-like gRPC server serving only KVGroup, over `sink`."""

    def __init__(self, sink, timeout=TIMEOUT):
        self.sink = sink
        self.service = KVGroupService(sink, sink.layout, "cpu", timeout=timeout)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        worker_pb2_grpc.add_KVGroupServicer_to_server(self.service, self.server)
        self.addr = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def stop(self):
        self.sink.gate.set()
        self.server.stop(None).wait()


@pytest.fixture
def group_server():
    servers = []

    def start(sink, **kwargs):
        servers.append(GroupServer(sink, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def send_all(sender, k, v, block_ids=SENDER_BLOCKS):
    for layer in range(len(k)):
        sender.send_layer(layer, k[layer], v[layer], block_ids)
    return sender.finish()


def assert_received(sink, k, v, block_ids, request_id="req-1"):
    dest_ids = sink.committed[request_id]
    for layer in range(len(k)):
        for name, src, dst in (("k", k, sink.k), ("v", v, sink.v)):
            sent = src[layer][block_ids[:len(dest_ids)]].view(torch.uint8)
            got = dst[layer][dest_ids].view(torch.uint8)
            assert torch.equal(sent, got), f"layer {layer} {name} differs"


def eventually(predicate, timeout=TIMEOUT + 2):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def free_blocks_return(sink, expected, timeout=TIMEOUT + 2):
    return eventually(lambda: len(sink.free) == expected, timeout)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_bytes_arrive_identical_between_scattered_blocks(group_server, dtype):
    layout = make_layout(dtype)
    server = group_server(TensorSink(layout))
    k, v = make_cache(layout, 32, seed=1)
    with NcclKVTransport(device="cpu", timeout=TIMEOUT) as transport:
        result = send_all(transport.open(server.addr, make_header(layout, 45)), k, v)
    assert result.bytes == 2 * layout.num_layers * 12 * block_bytes(layout)
    assert_received(server.sink, k, v, SENDER_BLOCKS)


@pytest.mark.parametrize("first", [0, 5])
def test_consecutive_blocks_are_sent_straight_from_the_cache(group_server, first):
    layout = make_layout("bfloat16", num_layers=12)  # more layers than frames in flight
    server = group_server(TensorSink(layout))
    k, v = make_cache(layout, 32, seed=3)
    ids = list(range(first, first + 12))
    with NcclKVTransport(device="cpu", timeout=TIMEOUT) as transport:
        for request_id in ("r1", "r2"):  # the second reuses the group and its buffers
            header = make_header(layout, 45, request_id=request_id)
            result = send_all(transport.open(server.addr, header), k, v, block_ids=ids)
            assert result.bytes == 2 * layout.num_layers * 12 * block_bytes(layout)
            assert_received(server.sink, k, v, ids, request_id=request_id)


def test_transfers_of_different_sizes_interleave_on_one_group(group_server):
    layout = make_layout(num_layers=8)
    server = group_server(TensorSink(layout, num_blocks=128))
    k, v = make_cache(layout, 32, seed=4)
    sizes = {"small": 3, "large": 45, "medium": 20, "tiny": 1}
    with NcclKVTransport(device="cpu", timeout=TIMEOUT) as transport:
        senders = {rid: transport.open(server.addr, make_header(layout, n, request_id=rid)) for rid, n in sizes.items()}
        for layer in range(layout.num_layers):
            for sender in senders.values():
                sender.send_layer(layer, k[layer], v[layer], SENDER_BLOCKS)
        results = {rid: s.finish() for rid, s in senders.items()}
    for rid, n in sizes.items():
        assert results[rid].bytes == 2 * layout.num_layers * -(-n // 4) * block_bytes(layout)
        assert_received(server.sink, k, v, SENDER_BLOCKS, request_id=rid)


def test_concurrent_transfers_share_one_group(group_server):
    layout = make_layout()
    server = group_server(TensorSink(layout, num_blocks=128))
    caches = [make_cache(layout, 32, seed=s) for s in range(6)]
    with NcclKVTransport(device="cpu", timeout=TIMEOUT) as transport:
        senders = [transport.open(server.addr, make_header(layout, 45, request_id=f"r{i}")) for i in range(6)]
        # Interleave layers across transfers, as a prefill batch does.
        for layer in range(layout.num_layers):
            for sender, (k, v) in zip(senders, caches):
                sender.send_layer(layer, k[layer], v[layer], SENDER_BLOCKS)
        results = [s.finish() for s in senders]
    assert all(r.bytes == 2 * layout.num_layers * 12 * block_bytes(layout) for r in results)
    for i, (k, v) in enumerate(caches):
        assert_received(server.sink, k, v, SENDER_BLOCKS, request_id=f"r{i}")
    assert eventually(lambda: server.service.groups() == 0)  # closing the transport closed both sides


@pytest.mark.parametrize("field,value", [("head_dim", 16), ("dtype", "bfloat16"), ("block_size", 8)])
def test_layout_mismatch_is_refused_at_connect(group_server, field, value):
    server = group_server(TensorSink(make_layout()))
    theirs = make_layout(**{field: value})
    k, v = make_cache(theirs, 32)
    with NcclKVTransport(device="cpu", timeout=TIMEOUT) as transport:
        with pytest.raises(LayoutMismatch, match=field):
            send_all(transport.open(server.addr, make_header(theirs, 20)), k, v)
    assert server.service.groups() == 0


def test_capacity_refusal_sends_nothing_and_keeps_the_group(group_server):
    layout = make_layout()
    server = group_server(TensorSink(layout, num_blocks=12))
    k, v = make_cache(layout, 32)
    with NcclKVTransport(device="cpu", timeout=TIMEOUT) as transport:
        with pytest.raises(CapacityError, match="KV blocks"):
            send_all(transport.open(server.addr, make_header(layout, 60, request_id="big")), k, v,
                     block_ids=list(range(15)))
        send_all(transport.open(server.addr, make_header(layout, 45)), k, v)  # same group, still works
        assert server.service.groups() == 1
    assert_received(server.sink, k, v, SENDER_BLOCKS)


def test_abort_mid_transfer_frees_the_blocks_and_the_group_stays_usable(group_server):
    layout = make_layout()
    sink = TensorSink(layout)
    server = group_server(sink)
    k, v = make_cache(layout, 32)
    with NcclKVTransport(device="cpu", timeout=TIMEOUT) as transport:
        sender = transport.open(server.addr, make_header(layout, 45, request_id="gone"))
        sender.send_layer(0, k[0], v[0], SENDER_BLOCKS)
        sender.abort()
        with pytest.raises(TransferAborted):
            sender.finish()
        assert free_blocks_return(sink, 64)
        send_all(transport.open(server.addr, make_header(layout, 45)), k, v)
    assert_received(sink, k, v, SENDER_BLOCKS)
    assert "gone" not in sink.committed


def test_missing_layers_fail_both_sides(group_server):
    layout = make_layout()
    sink = TensorSink(layout)
    server = group_server(sink)
    k, v = make_cache(layout, 32)
    with NcclKVTransport(device="cpu", timeout=TIMEOUT) as transport:
        sender = transport.open(server.addr, make_header(layout, 45))
        sender.send_layer(0, k[0], v[0], SENDER_BLOCKS)
        with pytest.raises(KVDataLoss, match=r"layers \[1, 2\]"):
            sender.finish()
    assert free_blocks_return(sink, 64)
    assert not sink.committed


def test_a_stalled_sender_is_timed_out_by_the_token_side(group_server):
    layout = make_layout()
    sink = TensorSink(layout)
    server = group_server(sink, timeout=1.0)
    k, v = make_cache(layout, 32)
    with NcclKVTransport(device="cpu", timeout=TIMEOUT) as transport:
        sender = transport.open(server.addr, make_header(layout, 45))
        sender.send_layer(0, k[0], v[0], SENDER_BLOCKS)  # then nothing: the prompt phase hung
        started = time.monotonic()
        assert free_blocks_return(sink, 64, timeout=4)
        assert time.monotonic() - started < 3
        assert eventually(lambda: sender.error is not None, timeout=2)  # the refusal reaches the sender
        with pytest.raises(TransferError, match="no KV data"):
            sender.finish()


def test_unreachable_token_worker_fails_finish_not_open():
    layout = make_layout()
    k, v = make_cache(layout, 32)
    with NcclKVTransport(device="cpu", timeout=1.0) as transport:
        sender = transport.open("127.0.0.1:1", make_header(layout, 45))
        started = time.monotonic()
        with pytest.raises(TransferError):
            send_all(sender, k, v)
        assert time.monotonic() - started < 3


def test_a_restarted_token_worker_gets_a_new_group(group_server):
    layout = make_layout()
    first = group_server(TensorSink(layout))
    k, v = make_cache(layout, 32)
    with NcclKVTransport(device="cpu", timeout=TIMEOUT) as transport:
        send_all(transport.open(first.addr, make_header(layout, 45)), k, v)
        port = first.addr.rsplit(":", 1)[1]
        first.stop()
        second = GroupServer(TensorSink(layout))  # a fresh process would know nothing of the old group
        second.server.stop(None).wait()
        second.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        worker_pb2_grpc.add_KVGroupServicer_to_server(second.service, second.server)
        assert second.server.add_insecure_port(f"127.0.0.1:{port}")
        second.server.start()
        try:
            with pytest.raises(TransferError):  # the old group is gone with the old worker
                send_all(transport.open(first.addr, make_header(layout, 45, request_id="lost")), k, v)
            send_all(transport.open(first.addr, make_header(layout, 45)), k, v)
            assert_received(second.sink, k, v, SENDER_BLOCKS)
        finally:
            second.stop()


@pytest.mark.parametrize("bad,message", [
    (dict(layer=7), "layer must be in"),
    (dict(k=torch.zeros(32, 4, 2, 8, dtype=torch.float16)), "k must be torch.float32"),
    (dict(block_ids=[0, 1]), "block_ids has 2 ids"),
])
def test_bad_send_layer_arguments_name_the_argument(group_server, bad, message):
    layout = make_layout()
    server = group_server(TensorSink(layout))
    k, v = make_cache(layout, 32)
    args = dict(layer=0, k=k[0], v=v[0], block_ids=SENDER_BLOCKS) | bad
    with NcclKVTransport(device="cpu", timeout=TIMEOUT) as transport:
        sender = transport.open(server.addr, make_header(layout, 45))
        with pytest.raises(ValueError, match=message):
            sender.send_layer(**args)
        sender.abort()


def test_bad_transport_options_name_the_option():
    with pytest.raises(ValueError, match="timeout"):
        NcclKVTransport(timeout=0)
    with pytest.raises(ValueError, match="max_queued_layers"):
        NcclKVTransport(max_queued_layers=0)


def test_a_sender_thread_ends_with_the_transport(group_server):
    layout = make_layout()
    server = group_server(TensorSink(layout))
    k, v = make_cache(layout, 32)
    before = {t.ident for t in threading.enumerate()}
    with NcclKVTransport(device="cpu", timeout=TIMEOUT) as transport:
        send_all(transport.open(server.addr, make_header(layout, 45)), k, v)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        extra = [t.name for t in threading.enumerate() if t.ident not in before and t.name.startswith("kv-")]
        if not extra:
            break
        time.sleep(0.05)
    assert not extra, f"threads left running: {extra}"
