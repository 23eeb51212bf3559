"""The KV transport contract, over every backend (grpc, gloo: the nccl backend on CPU, tcp), on 127.0.0.1.

Each test runs a real token-worker-like gRPC server with the backend's receiving side over a
TensorSink, and the backend's sending side in this process."""

from __future__ import annotations

import time

import pytest
import torch
from support.kv_sink import (
    SENDER_BLOCKS, TensorSink, all_free, assert_received, eventually, make_cache, make_header, make_layout, send_all,
)

from phasesplit.transport.base import CapacityError, KVDataLoss, LayoutMismatch, TransferAborted, TransferError, block_bytes

@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_bytes_arrive_identical_between_scattered_blocks(no_thread_leaks, backend, dtype):
    layout = make_layout(dtype)
    server = backend.serve(TensorSink(layout))
    k, v = make_cache(layout, 32, seed=1)
    with backend.transport() as transport:
        result = send_all(transport.open(server.addr, make_header(layout, 45)), k, v)  # 12 blocks, the last partly
    assert result.bytes == 2 * layout.num_layers * 12 * block_bytes(layout)
    assert result.seconds > 0
    assert_received(server.sink, k, v, SENDER_BLOCKS)


def test_a_layer_sent_in_pieces_arrives_whole(backend):
    """A chunked prefill sends each chunk's blocks of every layer as the chunk is computed."""
    layout = make_layout()
    server = backend.serve(TensorSink(layout))
    k, v = make_cache(layout, 32, seed=3)
    pieces = [(0, 5), (5, 9), (9, 12)]  # (first, end): uneven, the last one ends mid-run
    with backend.transport() as transport:
        sender = transport.open(server.addr, make_header(layout, 45))
        for first, end in pieces:
            for layer in range(layout.num_layers):
                sender.send_layer(layer, k[layer], v[layer], SENDER_BLOCKS[first:end], first=first)
        result = sender.finish()
    assert result.bytes == 2 * layout.num_layers * 12 * block_bytes(layout)
    assert_received(server.sink, k, v, SENDER_BLOCKS)


def test_finish_before_the_last_piece_fails_and_frees_the_blocks(backend):
    layout = make_layout()
    server = backend.serve(TensorSink(layout))
    k, v = make_cache(layout, 32, seed=3)
    with backend.transport() as transport:
        sender = transport.open(server.addr, make_header(layout, 45))
        for layer in range(layout.num_layers):
            sender.send_layer(layer, k[layer], v[layer], SENDER_BLOCKS[:6])
        with pytest.raises(KVDataLoss, match=r"every block was sent of layers \[0, 1, 2\]"):
            sender.finish()
    assert all_free(server.sink)


def test_per_sequence_tensors_without_block_ids(backend):
    layout = make_layout("bfloat16")
    server = backend.serve(TensorSink(layout))
    k, v = make_cache(layout, 5, seed=2)
    with backend.transport() as transport:
        send_all(transport.open(server.addr, make_header(layout, 17)), k, v, block_ids=None)
    assert_received(server.sink, k, v, [0, 1, 2, 3, 4])


@pytest.mark.parametrize("field, value", [("block_size", 8), ("dtype", "float16"), ("num_kv_heads", 4)])
def test_layout_mismatch_is_refused_before_any_data(backend, field, value):
    server = backend.serve(TensorSink(make_layout()))
    theirs = make_layout(**{field: value})
    k, v = make_cache(theirs, 16)
    with backend.transport() as transport, pytest.raises(LayoutMismatch) as err:
        send_all(transport.open(server.addr, make_header(theirs, 20)), k, v, block_ids=None)
    ours = getattr(make_layout(), field)
    assert field in str(err.value) and repr(ours) in str(err.value) and repr(value) in str(err.value)
    assert server.sink.destinations == []


def test_capacity_refusal_then_the_next_transfer_goes_through(backend):
    layout = make_layout()
    server = backend.serve(TensorSink(layout, num_blocks=12))
    k, v = make_cache(layout, 32)
    with backend.transport() as transport:
        with pytest.raises(CapacityError, match="need 15 KV blocks, 12 free"):
            send_all(transport.open(server.addr, make_header(layout, 60, request_id="big")), k, v,
                     block_ids=list(range(15)))
        send_all(transport.open(server.addr, make_header(layout, 45)), k, v)
    assert_received(server.sink, k, v, SENDER_BLOCKS)


def test_missing_layers_fail_both_sides(backend):
    layout = make_layout()
    server = backend.serve(TensorSink(layout))
    k, v = make_cache(layout, 32)
    with backend.transport() as transport:
        sender = transport.open(server.addr, make_header(layout, 45))
        sender.send_layer(0, k[0], v[0], SENDER_BLOCKS)
        with pytest.raises(KVDataLoss, match=r"layers \[1, 2\]"):
            sender.finish()
    assert all_free(server.sink)
    assert server.sink.committed == {}


def test_a_stalled_sender_makes_the_receiver_free_the_blocks_within_its_timeout(backend):
    layout = make_layout()
    server = backend.serve(TensorSink(layout), timeout=0.5)
    k, v = make_cache(layout, 32)
    with backend.transport() as transport:
        sender = transport.open(server.addr, make_header(layout, 45))
        sender.send_layer(0, k[0], v[0], SENDER_BLOCKS)  # then nothing: the prompt phase hung
        assert eventually(lambda: server.sink.destinations and server.sink.destinations[0].writes == 2)
        started = time.monotonic()
        assert eventually(lambda: server.sink.aborted_at is not None, timeout=4)
        assert server.sink.aborted_at - started < 2.5
        sender.send_layer(1, k[1], v[1], SENDER_BLOCKS)  # a failed transfer never raises here...
        sender.send_layer(2, k[2], v[2], SENDER_BLOCKS)
        with pytest.raises(TransferError):  # ...but finish() does
            sender.finish()
    assert all_free(server.sink)


def test_abort_frees_the_blocks_and_the_next_transfer_goes_through(backend):
    layout = make_layout()
    server = backend.serve(TensorSink(layout))
    k, v = make_cache(layout, 32)
    with backend.transport() as transport:
        sender = transport.open(server.addr, make_header(layout, 45, request_id="gone"))
        sender.send_layer(0, k[0], v[0], SENDER_BLOCKS)
        assert eventually(lambda: server.sink.destinations and server.sink.destinations[0].writes == 2)
        sender.abort()
        sender.abort()
        sender.send_layer(1, k[1], v[1], SENDER_BLOCKS)  # ignored after abort
        with pytest.raises(TransferAborted):
            sender.finish()
        assert all_free(server.sink)
        send_all(transport.open(server.addr, make_header(layout, 45)), k, v)
    assert_received(server.sink, k, v, SENDER_BLOCKS)
    assert "gone" not in server.sink.committed


def test_unreachable_token_worker_fails_finish_not_open(backend):
    layout = make_layout()
    k, v = make_cache(layout, 32)
    with backend.transport(timeout=1.0) as transport:
        sender = transport.open("127.0.0.1:1", make_header(layout, 45))
        started = time.monotonic()
        with pytest.raises(TransferError):
            send_all(sender, k, v)
        assert time.monotonic() - started < 3


def test_concurrent_transfers_of_different_sizes_interleave(backend):
    layout = make_layout(num_layers=8)
    server = backend.serve(TensorSink(layout, num_blocks=128))
    k, v = make_cache(layout, 32, seed=4)
    sizes = {"small": 3, "large": 45, "medium": 20, "tiny": 1}
    with backend.transport() as transport:
        senders = {rid: transport.open(server.addr, make_header(layout, n, request_id=rid)) for rid, n in sizes.items()}
        for layer in range(layout.num_layers):  # layers interleave across transfers, as in a prefill batch
            for sender in senders.values():
                sender.send_layer(layer, k[layer], v[layer], SENDER_BLOCKS)
        results = {rid: s.finish() for rid, s in senders.items()}
    for rid, n in sizes.items():
        assert results[rid].bytes == 2 * layout.num_layers * -(-n // 4) * block_bytes(layout)
        if n > 4:
            assert_received(server.sink, k, v, SENDER_BLOCKS, request_id=rid)


@pytest.mark.parametrize("bad, message", [
    (dict(layer=3), r"layer must be in \[0, 3\)"),
    (dict(k=torch.zeros(32, 4, 2, 8, dtype=torch.float16)), "k must be torch.float32"),
    (dict(block_ids=[0], first=4), "first must be 0"),
    (dict(block_ids=[]), "block_ids must not be empty"),
    (dict(block_ids=[0, 99] * 6), r"block_ids must be in \[0, 32\)"),
])
def test_bad_send_layer_arguments_name_the_argument(backend, bad, message):
    layout = make_layout()
    server = backend.serve(TensorSink(layout))
    k, v = make_cache(layout, 32)
    args = dict(layer=0, k=k[0], v=v[0], block_ids=SENDER_BLOCKS) | bad
    with backend.transport() as transport:
        sender = transport.open(server.addr, make_header(layout, 45))
        with pytest.raises(ValueError, match=message):
            sender.send_layer(**args)
        sender.abort()


def test_bad_headers_name_the_field(backend):
    with backend.transport() as transport:
        with pytest.raises(ValueError, match="layout.dtype must be one of"):
            transport.open("127.0.0.1:1", make_header(make_layout("int8"), 4))
        with pytest.raises(ValueError, match="header.request_id must not be empty"):
            transport.open("127.0.0.1:1", make_header(make_layout(), 4, request_id=""))


def _snapshot(sink):
    return [t.clone() for t in sink.k], [t.clone() for t in sink.v]


@pytest.mark.parametrize("per_sequence", [False, True])
def test_blocks_the_token_worker_holds_are_neither_sent_nor_written(backend, per_sequence):
    """num_cached_blocks = 4 of a 12-block prompt: only blocks [4, 12) move, in pieces from position 4;
    the receiver's first 4 blocks keep what they held."""
    layout = make_layout()
    server = backend.serve(TensorSink(layout))
    k, v = make_cache(layout, 32 if not per_sequence else 12, seed=5)
    held_k, held_v = _snapshot(server.sink)
    header = make_header(layout, 45)
    header.num_cached_blocks = 4
    with backend.transport() as transport:
        sender = transport.open(server.addr, header)
        if per_sequence:  # the whole sequence's blocks, sent from position 4
            for layer in range(layout.num_layers):
                sender.send_layer(layer, k[layer], v[layer], None, first=4)
        else:
            for first, end in [(4, 9), (9, 12)]:
                for layer in range(layout.num_layers):
                    sender.send_layer(layer, k[layer], v[layer], SENDER_BLOCKS[first:end], first=first)
        result = sender.finish()
    assert result.bytes == 2 * layout.num_layers * 8 * block_bytes(layout)
    dest_ids = server.sink.committed["req-1"]
    sent = list(range(12)) if per_sequence else SENDER_BLOCKS
    for layer in range(layout.num_layers):
        for src, dst, held in ((k, server.sink.k, held_k), (v, server.sink.v, held_v)):
            assert torch.equal(dst[layer][dest_ids[:4]], held[layer][dest_ids[:4]])
            assert torch.equal(dst[layer][dest_ids[4:]], src[layer][sent[4:12]])


def test_a_piece_before_the_blocks_the_token_worker_lacks_is_refused(backend):
    layout = make_layout()
    server = backend.serve(TensorSink(layout))
    k, v = make_cache(layout, 32, seed=5)
    header = make_header(layout, 45)
    header.num_cached_blocks = 4
    with backend.transport() as transport:
        sender = transport.open(server.addr, header)
        with pytest.raises(ValueError, match="first must be 4"):
            sender.send_layer(0, k[0], v[0], SENDER_BLOCKS, first=0)
        sender.abort()


def test_a_header_may_not_count_the_last_tokens_block_as_held(backend):
    header = make_header(make_layout(), 45)   # 12 blocks, the last partly full: at most 11 held
    header.num_cached_blocks = 12
    with backend.transport() as transport, pytest.raises(ValueError, match=r"num_cached_blocks must be in \[0, 11\]"):
        transport.open("127.0.0.1:1", header)
