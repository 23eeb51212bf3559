"""The hand-made KVChunk encoding is the generated class's wire format; layout checks name fields."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
import torch
from support.kv_sink import make_header, make_layout

from phasesplit.transport import make_transport, wire
from phasesplit.transport.base import (
    LayoutMismatch, block_bytes, check_layout, num_prompt_blocks, validate_layout,
)
from phasesplit.transport.layout import KVLayout
from phasesplit.transport.blocks import read_pieces, runs, write_blocks
from phasesplit.v1 import worker_pb2 as pb


@pytest.mark.parametrize("fields", [
    dict(layer=3, kind=1, block_start=130, block_count=2),
    dict(layer=0, kind=0, block_start=0, block_count=1),  # zeros are omitted, as protobuf does
    dict(layer=300000, kind=1, block_start=1 << 31, block_count=7),
])
def test_encoded_chunk_is_what_the_generated_class_writes_and_reads(fields):
    pieces = [memoryview(b"abc" * 100), memoryview(bytes(range(256)))]
    raw = wire.encode_data(fields["layer"], fields["kind"], fields["block_start"], fields["block_count"], pieces)
    expected = pb.KVChunk(**fields, checksum=wire.checksum(pieces), data=b"".join(pieces))
    assert raw == expected.SerializeToString()
    assert pb.KVChunk.FromString(raw) == expected
    chunk = wire.decode(expected.SerializeToString())
    assert {k: getattr(chunk, k) for k in fields} == fields
    assert bytes(chunk.data) == expected.data and chunk.checksum == expected.checksum


def test_header_chunk_round_trips():
    header = make_header(make_layout("bfloat16"), 33)
    chunk = wire.decode(wire.encode_header(header))
    assert chunk.header == header and len(chunk.data) == 0
    assert wire.decode(pb.KVChunk(header=header)).header == header


def test_unknown_fields_are_skipped_and_garbage_is_refused():
    raw = pb.KVChunk(layer=2, data=b"xyz").SerializeToString()
    assert bytes(wire.decode(b"\x45\x01\x02\x03\x04" + raw).data) == b"xyz"  # field 8, fixed32
    with pytest.raises(wire.WireError, match="runs past the end"):
        wire.decode(raw[:-1])
    with pytest.raises(wire.WireError, match="unsupported wire type"):
        wire.decode(b"\x0b")


def test_checksum_is_crc32c():
    assert wire.checksum([b"123456789"]) == 0xE3069283  # the CRC-32C check value
    assert wire.checksum([b"1234", memoryview(b"56789")]) == 0xE3069283


def test_copy_checked_writes_across_views_and_pieces_and_returns_their_crc32c():
    data = bytes(range(256)) * 40  # 10240 bytes
    views = [memoryview(bytearray(3000)), memoryview(bytearray(7240))]
    crc = wire.copy_checked(memoryview(data), views, piece=1024)
    assert b"".join(bytes(v) for v in views) == data
    assert crc == wire.checksum((data,))


def test_layout_mismatch_names_each_field_with_both_values():
    ours = make_layout("bfloat16", block_size=16)
    with pytest.raises(LayoutMismatch) as err:
        check_layout(ours, make_layout("float16", block_size=32))
    assert err.value.fields == {"dtype": ("bfloat16", "float16"), "block_size": (16, 32)}
    assert "dtype: 'bfloat16' here, 'float16' from the sender" in str(err.value)
    assert "block_size: 16 here, 32 from the sender" in str(err.value)
    check_layout(ours, make_layout("bfloat16", block_size=16))


def test_the_engine_layout_and_the_header_layout_are_one_type():
    engine_layout = KVLayout(model="tiny", dtype="float32", num_layers=3, num_kv_heads=2, head_dim=8, block_size=4)
    assert KVLayout.from_proto(make_layout()) == engine_layout  # an unset tensor_parallel_size is 1
    assert KVLayout.from_proto(engine_layout.to_proto()) == engine_layout
    check_layout(engine_layout, make_layout())
    check_layout(make_layout(), engine_layout)


@pytest.mark.parametrize("field, value, message", [
    ("dtype", "int8", "layout.dtype must be one of"),
    ("block_size", 0, "layout.block_size must be >= 1"),
    ("num_layers", 0, "layout.num_layers must be >= 1"),
])
def test_unusable_layouts_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        validate_layout(make_layout(**{field: value}))


def test_layout_sizes():
    layout = make_layout("bfloat16", num_kv_heads=8, head_dim=128, block_size=16)
    assert block_bytes(layout) == 32 << 10
    assert num_prompt_blocks(make_header(layout, 33)) == 3


def test_blocks_are_read_and_written_as_runs_of_consecutive_ids():
    assert list(runs([4, 5, 6, 9, 1, 2])) == [(0, 4, 3), (3, 9, 1), (4, 1, 2)]
    src = torch.arange(10 * 4, dtype=torch.float32).view(10, 2, 2, 1)
    ids = [7, 8, 2, 3, 0]
    data = b"".join(read_pieces(src, ids, 1, 4))
    assert len(data) == 4 * 16
    dst = torch.zeros(6, 2, 2, 1)
    write_blocks(dst, [5, 0, 1, 3], memoryview(data))
    assert torch.equal(dst[[5, 0, 1, 3]], src[[8, 2, 3, 0]])
    with pytest.raises(ValueError, match="data holds 64 bytes, 3 blocks need 48"):
        write_blocks(dst, [0, 1, 2], memoryview(data))


def test_non_contiguous_destination_takes_the_gather_path():
    dst = torch.zeros(2, 6, 2, 1).transpose(0, 1)  # [6 blocks, 2, 2, 1], not contiguous
    src = torch.randn(2, 2, 2, 1)
    write_blocks(dst, [4, 1], memoryview(src.numpy().tobytes()))
    assert torch.equal(dst[[4, 1]], src)


def test_backends_by_name():
    with make_transport("grpc", chunk_bytes=1 << 16) as transport:
        assert transport.name == "grpc"
    with make_transport("nccl", device="cpu", timeout=5) as transport:
        assert transport.name == "nccl" and transport.backend == "gloo"  # CPU caches: the gloo process group
    with pytest.raises(ValueError, match="kv backend must be one of \\['grpc', 'nccl', 'tcp'\\], got 'nccl2'"):
        make_transport("nccl2")


def test_tune_malloc_raises_the_glibc_thresholds():
    code = "from phasesplit.transport.malloc import tune_malloc; print(tune_malloc())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    settings = ast.literal_eval(out)
    assert settings["mmap_threshold"] >= 32 << 20 and settings["trim_threshold"] == 1 << 30


def test_unequal_tensor_parallel_sizes_are_refused_naming_both():
    with pytest.raises(LayoutMismatch) as err:
        check_layout(make_layout(), pb.KVLayout(**{**_fields(make_layout()), "tensor_parallel_size": 4}))
    assert "tensor-parallel size 1, the prompt worker 4" in str(err.value)
    with pytest.raises(LayoutMismatch, match="tensor_parallel_rank: 0 here, 1 from the sender"):
        check_layout(make_layout(), pb.KVLayout(**{**_fields(make_layout()), "tensor_parallel_rank": 1}))
    check_layout(make_layout(), pb.KVLayout(**{**_fields(make_layout()), "tensor_parallel_size": 1}))


def _fields(layout: pb.KVLayout) -> dict:
    return {f.name: v for f, v in layout.ListFields()}
