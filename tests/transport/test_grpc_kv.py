"""KV over real gRPC on 127.0.0.1: bytes, refusals, corruption, stalls, backpressure, aborts, leaks."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from phasesplit.transport import wire
from phasesplit.transport.base import (
    KVDataLoss, TransferTimeout, block_bytes,
)
from phasesplit.transport.grpc_kv import GrpcKVTransport

from support.kv_sink import SENDER_BLOCKS, TensorSink, assert_received, make_cache, make_header, make_layout, send_all

@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("generated_registration", [False, True])
def test_bytes_arrive_identical_between_scattered_blocks(no_thread_leaks, serve, dtype, generated_registration):
    layout = make_layout(dtype)
    server = serve(TensorSink(layout), generated_registration=generated_registration)
    k, v = make_cache(layout, 32, seed=1)
    num_tokens = 45  # 12 blocks, the last one partly filled
    with GrpcKVTransport(chunk_bytes=4096) as transport:  # several chunks per layer
        result = send_all(transport.open(server.addr, make_header(layout, num_tokens)), k, v)
    assert result.bytes == 2 * layout.num_layers * 12 * block_bytes(layout)
    assert result.seconds > 0
    assert_received(server.sink, k, v, SENDER_BLOCKS)


def test_corrupted_chunk_is_detected_and_the_destination_freed(no_thread_leaks, serve, monkeypatch):
    layout = make_layout()
    server = serve(TensorSink(layout))
    encode, count = wire.encode_data, [0]

    def corrupt_third_chunk(*args):
        data = encode(*args)
        count[0] += 1
        return data[:-1] + bytes([data[-1] ^ 1]) if count[0] == 3 else data

    monkeypatch.setattr(wire, "encode_data", corrupt_third_chunk)
    k, v = make_cache(layout, 32)
    with GrpcKVTransport(chunk_bytes=4096) as transport, pytest.raises(KVDataLoss, match="checksum mismatch in layer"):
        send_all(transport.open(server.addr, make_header(layout, 45)), k, v)
    (dest,) = server.sink.destinations
    # the corrupted chunk lands in its reserved blocks, is checked there, and takes them down with it
    assert dest.state == "aborted" and dest.writes == 3
    assert sorted(server.sink.free) == list(range(server.sink.num_blocks))
    assert server.sink.committed == {}


def test_a_stalled_receiver_makes_finish_raise_within_the_timeout(no_thread_leaks, serve):
    layout = make_layout()
    server = serve(TensorSink(layout))
    server.sink.gate.clear()  # the token worker stops taking chunks
    k, v = make_cache(layout, 16)
    with GrpcKVTransport(timeout=0.5) as transport:
        sender = transport.open(server.addr, make_header(layout, 8))
        for layer in range(layout.num_layers):
            sender.send_layer(layer, k[layer], v[layer])
        start = time.monotonic()
        with pytest.raises(TransferTimeout, match="no progress for 0.5s"):
            sender.finish()
        assert time.monotonic() - start < 1.5
        server.sink.gate.set()
    _wait_for(lambda: server.sink.destinations[0].state == "aborted")
    assert len(server.sink.free) == server.sink.num_blocks


def test_a_slow_receiver_blocks_send_layer_after_the_queue_bound(no_thread_leaks, serve):
    layout = make_layout(num_layers=512, num_kv_heads=2, head_dim=64, block_size=16)  # 8 KiB blocks
    server = serve(TensorSink(layout, num_blocks=16, share_layers=True))
    server.sink.gate.clear()
    k, v = make_cache(make_layout(num_layers=1, num_kv_heads=2, head_dim=64, block_size=16), 8)
    k, v = k * layout.num_layers, v * layout.num_layers  # 64 MiB to send, 128 KiB of source tensors
    accepted = []
    with GrpcKVTransport(chunk_bytes=64 << 10, max_queued_chunks=4) as transport:
        sender = transport.open(server.addr, make_header(layout, 128))  # 8 blocks = one 64 KiB chunk per K or V

        def produce():
            for layer in range(layout.num_layers):
                sender.send_layer(layer, k[layer], v[layer])
                accepted.append(layer)

        producer = threading.Thread(target=produce)
        producer.start()
        time.sleep(1.0)
        assert producer.is_alive(), "send_layer never blocked"
        assert sender.queued_chunks <= 4
        blocked_at = len(accepted)
        assert blocked_at < layout.num_layers // 2  # the rest is in gRPC's flow-control window and socket buffers
        time.sleep(0.3)
        assert len(accepted) == blocked_at  # still held back: the queue does not grow
        server.sink.gate.set()
        producer.join(10)
        assert not producer.is_alive()
        sender.finish()
    assert_received(server.sink, k, v, list(range(8)))


def test_abort_after_every_layer_was_sent_is_never_taken_for_a_complete_transfer(no_thread_leaks, serve):
    """A request that ends at its first token aborts a transfer whose bytes all arrived: the token
    worker must free them, not commit them (ending the stream by half-close would commit)."""
    layout = make_layout()
    server = serve(TensorSink(layout))
    k, v = make_cache(layout, 16)
    with GrpcKVTransport() as transport:
        for i in range(20):
            sender = transport.open(server.addr, make_header(layout, 8, request_id=f"req-{i}"))
            for layer in range(layout.num_layers):
                sender.send_layer(layer, k[layer], v[layer])
            _wait_for(lambda: len(server.sink.destinations) > i)
            dest = server.sink.destinations[i]
            _wait_for(lambda: dest.writes == 2 * layout.num_layers)
            sender.abort()
            _wait_for(lambda: dest.state != "open")
            assert dest.state == "aborted", f"transfer {i} was {dest.state} after the sender aborted it"
    assert server.sink.committed == {}
    assert len(server.sink.free) == server.sink.num_blocks


def test_bad_transport_options_name_the_option():
    with pytest.raises(ValueError, match="chunk_bytes must be in"):
        GrpcKVTransport(chunk_bytes=10)
    with pytest.raises(ValueError, match="max_queued_chunks must be >= 1"):
        GrpcKVTransport(max_queued_chunks=0)
    with pytest.raises(ValueError, match="layout.dtype must be one of"):
        GrpcKVTransport().open("127.0.0.1:1", make_header(make_layout("int8"), 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_caches_on_both_sides(no_thread_leaks, serve):
    layout = make_layout("bfloat16")
    server = serve(TensorSink(layout, device="cuda"))
    k, v = make_cache(layout, 32, seed=3, device="cuda")
    with GrpcKVTransport(chunk_bytes=4096) as transport:
        send_all(transport.open(server.addr, make_header(layout, 45)), k, v)
    assert_received(server.sink, [t.cpu() for t in k], [t.cpu() for t in v], SENDER_BLOCKS)


def _wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)
