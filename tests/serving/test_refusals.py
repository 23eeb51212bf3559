"""What a worker refuses, and how: incompatible KV layouts, corrupted chunks, unclaimed and stalled
KV, bad HTTP bodies. Each ends as a clear error or freed blocks, never as a hang or a leak."""

import threading
import time

import grpc
import pytest
from support.polling import poll
from support.serving import post_json, start_worker, worker_channel, worker_load

from phasesplit.transport import wire
from phasesplit.v1 import worker_pb2 as pb
from phasesplit.v1 import worker_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

GREEDY = pb.SamplingParams(temperature=0, top_p=1, max_tokens=8, ignore_eos=True)
PROMPT = list(range(3, 40))  # 37 tokens: 2 blocks of 32


@pytest.fixture(scope="module")
def odd_token_worker(tiny_model_dir, tmp_path_factory):
    """A token worker with 32-token blocks (the others use 16), a 1 s lease and a 2 s stall timeout."""
    proc, address = start_worker(tiny_model_dir, tmp_path_factory.mktemp("odd-logs"), "token",
                                 "--block-size", "32", "--kv-lease", "1", "--kv-transfer-timeout", "2")
    yield address
    proc.stop(10)


def info(address: str) -> pb.WorkerInfo:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.WorkerStub(channel).Info(pb.InfoRequest(), timeout=5)


def push_kv(address: str, chunks, timeout: float = 20):
    """A raw PushKV stream, chunks already encoded as they travel on the wire."""
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_unary("/phasesplit.v1.TokenWorker/PushKV", request_serializer=None,
                                    response_deserializer=pb.PushKVReply.FromString)
        return call(iter(chunks), timeout=timeout)


def kv_chunks(layout: pb.KVLayout, request_id: str, corrupt: bool = False) -> list[bytes]:
    header = pb.KVHeader(request_id=request_id, layout=layout, prompt_token_ids=PROMPT)
    blocks = -(-len(PROMPT) // layout.block_size)
    size = blocks * layout.block_size * layout.num_kv_heads * layout.head_dim * 4
    chunks = [wire.encode_header(header)]
    for layer in range(layout.num_layers):
        for kind in (0, 1):
            chunks.append(wire.encode_data(layer, kind, 0, blocks, [bytes([layer + 1]) * size]))
    chunks.append(wire.encode_end())
    if corrupt:
        damaged = bytearray(chunks[2])
        damaged[-1] ^= 0xFF
        chunks[2] = bytes(damaged)
    return chunks


def generate(address: str, request_id: str, timeout: float = 10):
    with grpc.insecure_channel(address) as channel:
        stream = pb_grpc.TokenWorkerStub(channel).Generate(
            pb.GenerateRequest(request_id=request_id, sampling=GREEDY, first_token=5), timeout=timeout)
        return [e for e in stream]


def wait_blocks_free(address: str, timeout: float) -> pb.WorkerLoad:
    return poll(lambda: worker_load(address), lambda load: not load.kv_blocks_used, timeout)


def test_a_token_worker_with_another_block_size_refuses_the_kv_naming_the_field(split, odd_token_worker):
    prompt_worker = split.addresses("prompt")[0]
    with worker_channel(prompt_worker) as channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.PromptWorkerStub(channel).Prefill(pb.PrefillRequest(
                request_id="mismatch-1", prompt_token_ids=PROMPT, sampling=GREEDY, token_worker=odd_token_worker),
                timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "block_size" in err.value.details() and "32" in err.value.details()
    assert wait_blocks_free(prompt_worker, 5).kv_blocks_used == 0
    assert worker_load(odd_token_worker).kv_blocks_used == 0


def test_a_corrupted_chunk_fails_the_transfer_and_the_generate_call(odd_token_worker):
    layout = info(odd_token_worker).layout
    with pytest.raises(grpc.RpcError) as err:
        push_kv(odd_token_worker, kv_chunks(layout, "corrupt-1", corrupt=True))
    assert err.value.code() == grpc.StatusCode.DATA_LOSS and "checksum" in err.value.details()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        generate(odd_token_worker, "corrupt-1")
    assert time.monotonic() - started < 5, "Generate must fail fast, not wait for KV that will never come"
    assert err.value.code() == grpc.StatusCode.ABORTED and "transfer" in err.value.details()
    assert worker_load(odd_token_worker).kv_blocks_used == 0


def test_kv_never_claimed_is_freed_after_the_lease(odd_token_worker):
    layout = info(odd_token_worker).layout
    reply = push_kv(odd_token_worker, kv_chunks(layout, "unclaimed-1"))
    assert reply.bytes_received > 0
    load = worker_load(odd_token_worker)
    assert load.kv_blocks_used == 2 and load.pending_transfers == 1
    load = wait_blocks_free(odd_token_worker, 5)
    assert (load.kv_blocks_used, load.pending_transfers) == (0, 0)
    with pytest.raises(grpc.RpcError) as err:
        generate(odd_token_worker, "unclaimed-1")
    assert "lease" in err.value.details()


def test_a_stalled_transfer_is_aborted_and_its_blocks_freed(odd_token_worker):
    layout = info(odd_token_worker).layout
    chunks = kv_chunks(layout, "stalled-1")
    resume = threading.Event()

    def stalling():
        yield from chunks[:2]
        resume.wait(15)  # the sender goes silent after its first data chunk

    errors = []
    pusher = threading.Thread(target=lambda: errors.append(_push_error(odd_token_worker, stalling())))
    pusher.start()
    time.sleep(0.5)
    assert worker_load(odd_token_worker).kv_blocks_used == 2
    load = wait_blocks_free(odd_token_worker, 6)
    resume.set()
    pusher.join()
    assert (load.kv_blocks_used, load.pending_transfers) == (0, 0)
    assert errors[0] is not None, "the stalled stream must end in an error"


def _push_error(address, chunks):
    try:
        push_kv(address, chunks)
    except grpc.RpcError as err:
        return err
    return None


def test_a_bad_http_body_is_an_openai_error_and_the_router_keeps_serving(split):
    url = f"{split.base_url}/v1/completions"
    status, body = post_json(url, b"{this is not json")
    assert status == 400
    assert body["error"]["message"] and body["error"]["type"] == "invalid_request_error"
    status, body = post_json(url, {"model": "tiny", "prompt": "hello", "max_tokens": 0})
    assert status == 400 and "max_tokens" in body["error"]["message"]
    status, body = post_json(url, {"model": "tiny", "prompt": "hello", "max_tokens": 3, "ignore_eos": True})
    assert status == 200 and body["usage"]["completion_tokens"] == 3
