"""What the per-pair backends add to the contract (gloo: the nccl backend on CPU, and tcp): one data
path per token worker, reused by every transfer, rebuilt when it breaks; gRPC as the control path."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch
from support.kv_sink import (
    SENDER_BLOCKS, ReceiverServer, TensorSink, all_free, assert_received, eventually, make_cache, make_header,
    make_layout, send_all,
)

from phasesplit.transport import sockets, tcp_receive
from phasesplit.transport.base import CachedBlocksGone, KVDataLoss, TransferError, block_bytes
from phasesplit.transport.nccl_kv import NcclKVTransport
from phasesplit.transport.kv_group import host_store
from phasesplit.transport.tcp_kv import TcpKVTransport
from phasesplit.transport.tcp_receive import TcpKVReceiver


@pytest.mark.parametrize("first", [0, 5])
def test_consecutive_blocks_are_sent_straight_from_the_cache(pair_backend, first):
    layout = make_layout("bfloat16", num_layers=12)  # more layers than frames in flight
    server = pair_backend.serve(TensorSink(layout))
    k, v = make_cache(layout, 32, seed=3)
    ids = list(range(first, first + 12))
    with pair_backend.transport() as transport:
        for request_id in ("r1", "r2"):  # the second reuses the pair and its buffers
            result = send_all(transport.open(server.addr, make_header(layout, 45, request_id=request_id)), k, v, ids)
            assert result.bytes == 2 * layout.num_layers * 12 * block_bytes(layout)
            assert_received(server.sink, k, v, ids, request_id=request_id)


def test_concurrent_transfers_share_one_pair_that_closes_with_the_transport(pair_backend):
    layout = make_layout()
    server = pair_backend.serve(TensorSink(layout, num_blocks=128))
    caches = [make_cache(layout, 32, seed=s) for s in range(6)]
    with pair_backend.transport() as transport:
        senders = [transport.open(server.addr, make_header(layout, 45, request_id=f"r{i}")) for i in range(6)]
        for layer in range(layout.num_layers):
            for sender, (k, v) in zip(senders, caches):
                sender.send_layer(layer, k[layer], v[layer], SENDER_BLOCKS)
        [s.finish() for s in senders]
        assert server.service.groups() == 1
    for i, (k, v) in enumerate(caches):
        assert_received(server.sink, k, v, SENDER_BLOCKS, request_id=f"r{i}")
    assert eventually(lambda: server.service.groups() == 0)  # closing the transport closed both sides


def test_a_restarted_token_worker_gets_a_new_pair(pair_backend):
    layout = make_layout()
    first = pair_backend.serve(TensorSink(layout))
    k, v = make_cache(layout, 32)
    with pair_backend.transport() as transport:
        send_all(transport.open(first.addr, make_header(layout, 45)), k, v)
        port = first.addr.rsplit(":", 1)[1]
        first.stop()
        second = ReceiverServer(TensorSink(layout), "nccl" if pair_backend.name == "gloo" else "tcp", port=int(port))
        try:
            with pytest.raises(TransferError):  # the old pair is gone with the old worker
                send_all(transport.open(first.addr, make_header(layout, 45, request_id="lost")), k, v)
            send_all(transport.open(first.addr, make_header(layout, 45)), k, v)
            assert_received(second.sink, k, v, SENDER_BLOCKS)
        finally:
            second.stop()


def test_a_broken_tcp_connection_fails_only_its_transfers_and_the_next_one_reconnects(backend_tcp):
    layout = make_layout()
    server = backend_tcp.serve(TensorSink(layout, num_blocks=128))
    k, v = make_cache(layout, 32)
    with backend_tcp.transport() as transport:
        send_all(transport.open(server.addr, make_header(layout, 45, request_id="before")), k, v)
        cut = transport.open(server.addr, make_header(layout, 45, request_id="cut"))
        cut.send_layer(0, k[0], v[0], SENDER_BLOCKS)
        assert eventually(lambda: len(server.sink.destinations) == 2 and server.sink.destinations[1].writes == 2)
        (group,) = server.service._groups.values()
        group.discard()  # the connection breaks (a reset, a dead peer's socket)
        with pytest.raises(TransferError):
            cut.send_layer(1, k[1], v[1], SENDER_BLOCKS)
            cut.send_layer(2, k[2], v[2], SENDER_BLOCKS)
            cut.finish()
        send_all(transport.open(server.addr, make_header(layout, 45)), k, v)
    assert_received(server.sink, k, v, SENDER_BLOCKS)
    assert "cut" not in server.sink.committed
    assert eventually(lambda: len(server.sink.free) == 128 - 2 * 12)  # "before" and the last one hold theirs


def test_a_transfer_refused_for_evicted_cached_blocks_keeps_the_connection(backend_tcp, monkeypatch):
    """NOT_FOUND for blocks the token worker no longer holds fails that transfer only: the next one goes
    over the same pair (a group the token worker forgot, also NOT_FOUND, makes a new one: see above)."""
    layout = make_layout()
    server = backend_tcp.serve(TensorSink(layout))
    k, v = make_cache(layout, 32)
    begin = server.sink.begin

    def evicted_once(header):
        if header.request_id == "evicted":
            raise CachedBlocksGone("request evicted: the header counts on blocks this worker no longer holds")
        return begin(header)

    monkeypatch.setattr(server.sink, "begin", evicted_once)
    with backend_tcp.transport() as transport:
        send_all(transport.open(server.addr, make_header(layout, 45, request_id="first")), k, v)
        groups = set(server.service._groups)
        with pytest.raises(CachedBlocksGone):
            send_all(transport.open(server.addr, make_header(layout, 45, request_id="evicted")), k, v)
        send_all(transport.open(server.addr, make_header(layout, 45)), k, v)
        assert set(server.service._groups) == groups
    assert_received(server.sink, k, v, SENDER_BLOCKS)


def test_corrupted_tcp_bytes_fail_their_transfer_and_the_connection_stays_usable(backend_tcp, monkeypatch):
    layout = make_layout()
    server = backend_tcp.serve(TensorSink(layout))
    k, v = make_cache(layout, 32)
    send_views, calls = sockets.send_views, [0]

    def corrupt_third(sock, views):
        calls[0] += 1
        return send_views(sock, views) ^ (calls[0] == 3)

    monkeypatch.setattr(sockets, "send_views", corrupt_third)
    with backend_tcp.transport() as transport:
        with pytest.raises(KVDataLoss, match="checksum mismatch in layer 1 K"):
            send_all(transport.open(server.addr, make_header(layout, 45, request_id="bad")), k, v)
        assert all_free(server.sink)
        send_all(transport.open(server.addr, make_header(layout, 45)), k, v)
        assert server.service.groups() == 1
    assert_received(server.sink, k, v, SENDER_BLOCKS)


@pytest.mark.parametrize("transport", [NcclKVTransport, TcpKVTransport])
def test_bad_transport_options_name_the_option(transport):
    with pytest.raises(ValueError, match="timeout"):
        transport(timeout=0)
    with pytest.raises(ValueError, match="max_queued_layers"):
        transport(max_queued_layers=0)


def test_a_sender_thread_ends_with_the_transport(pair_backend):
    layout = make_layout()
    server = pair_backend.serve(TensorSink(layout))
    k, v = make_cache(layout, 32)
    before = {t.ident for t in threading.enumerate()}
    with pair_backend.transport() as transport:
        send_all(transport.open(server.addr, make_header(layout, 45)), k, v)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        extra = [t.name for t in threading.enumerate() if t.ident not in before and t.name.startswith("kv-")]
        if not extra:
            break
        time.sleep(0.05)
    assert not extra, f"threads left running: {extra}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tcp_from_and_into_cuda_caches():
    layout = make_layout("bfloat16")
    sink = TensorSink(layout, device="cuda")
    server = ReceiverServer(sink, "tcp")
    k, v = make_cache(layout, 32, seed=3, device="cuda")
    try:
        with TcpKVTransport(device="cuda", timeout=10) as transport:
            send_all(transport.open(server.addr, make_header(layout, 45)), k, v)
        assert_received(sink, [t.cpu() for t in k], [t.cpu() for t in v], SENDER_BLOCKS)
    finally:
        server.stop()


def test_the_tcp_and_store_listeners_bind_the_workers_address_and_cap_unnamed_connections():
    receiver = TcpKVReceiver(TensorSink(make_layout()), make_layout(), "cpu", host="127.0.0.1")
    store, store_socket = host_store(0, 5.0, "127.0.0.1")
    try:
        assert receiver.listener.sock.getsockname()[0] == "127.0.0.1"
        assert store_socket.getsockname()[0] == "127.0.0.1" and store.port == store_socket.getsockname()[1]
        port = receiver.listener.port
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(tcp_receive.MAX_UNNAMED_CONNECTIONS)]
        extra = socket.create_connection(("127.0.0.1", port))
        extra.settimeout(5)
        assert extra.recv(1) == b"", "a connection beyond the cap is closed at once"
        for s in [*silent, extra]:
            s.close()
    finally:
        receiver.close()
        store_socket.close()
