"""A conversation's second turn through 1 prompt + 1 token worker moves only the KV blocks the token worker
lacks: the first turn's blocks stay cached there, the router tells the prompt worker so, and the transfer
skips them (grpc, tcp and nccl/gloo). The text is the same as when every block moves (the same turn under a
fresh `cache_salt`, which nothing holds), and no KV block is left held. When the token worker evicted the
blocks since the router last heard from it, it refuses the transfer and the router sends the request again
with every block."""

import os
import uuid

import grpc
import pytest
from support import prom
from support.serving import WORKER_TOKEN, manifest, metrics, start_cluster, wait_quiet, worker_channel
from support.turns import conversation, turn, words

from phasesplit import auth
from phasesplit.engine.tokenizer import Tokenizer
from phasesplit.local.processes import ManagedProcess, free_port, wait_http_ok
from phasesplit.v1 import worker_pb2 as pb
from phasesplit.v1 import worker_pb2_grpc as pb_grpc
from phasesplit.v1.conventions import KV_PEER_FAILED

pytestmark = pytest.mark.slow

BLOCK_SIZE = 16
TOKEN_BLOCKS = 48     # the token worker's whole cache: a few long prompts evict a conversation's blocks
MAX_MODEL_LEN = TOKEN_BLOCKS * BLOCK_SIZE


@pytest.fixture(scope="module", params=["grpc", "tcp", "nccl"])
def pair(request, tiny_model_dir, tmp_path_factory):
    doc = manifest(f"ship-{request.param}", {"prompt": 1, "token": 1})
    doc["spec"]["kvTransfer"]["backend"] = request.param
    doc["spec"]["model"]["maxModelLen"] = MAX_MODEL_LEN
    for pool in ("prompt", "token"):
        doc["spec"]["pools"][pool]["engine"] = {"numKvBlocks": TOKEN_BLOCKS, "maxNumSeqs": 8,
                                                "maxNumBatchedTokens": MAX_MODEL_LEN}
    cluster = start_cluster(doc, tiny_model_dir, tmp_path_factory.mktemp(f"ship-{request.param}-logs"))
    yield cluster
    cluster.stop(15)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return Tokenizer.from_dir(tiny_model_dir)


def test_the_second_turn_moves_only_the_blocks_the_token_worker_lacks(pair):
    salt, history = uuid.uuid4().hex, conversation(1)
    first, (_, sent1, held1) = turn(pair.base_url, history, salt)
    assert held1 == 0 and sent1 > 0
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "turn 2: " + words(9, 12)}]
    second, (moved, sent, held) = turn(pair.base_url, history, salt)
    every, (moved_all, sent_all, held_none) = turn(pair.base_url, history, uuid.uuid4().hex)
    assert second == every
    assert held >= sent1 - 1 and held_none == 0 and sent + held == sent_all
    assert moved < moved_all and moved * sent_all == moved_all * sent   # bytes in proportion to the blocks sent
    state = wait_quiet(pair)
    assert all(v == (0, 0, 0, 0) for k, v in state.items() if k != "router inflight"), state


@pytest.fixture
def deaf_router(pair, tmp_path):
    """A second router over the pair that polls the workers once, at its start: afterwards it believes what it
    saw and what it sent, as a router does between two polls."""
    port = free_port()
    argv = pair.router_argv(port) + ["--poll-interval", "3600"]
    proc = ManagedProcess("router-deaf", argv, tmp_path, env={**os.environ, auth.TOKEN_ENV: WORKER_TOKEN}).start()
    try:
        wait_http_ok(proc, f"http://127.0.0.1:{port}/health", 60)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop(10)


def test_blocks_evicted_meanwhile_are_sent_after_all(pair, deaf_router, tokenizer):
    salt, history = uuid.uuid4().hex, conversation(2)
    first, _ = turn(deaf_router, history, salt)
    for seed in range(3):   # long prompts of other tenants fill the token worker's cache: the turn's blocks go
        filler = [{"role": "user", "content": words(20 + seed, 200)}]
        assert len(tokenizer.encode_chat(filler)) < MAX_MODEL_LEN - 16
        turn(pair.base_url, filler, uuid.uuid4().hex)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "turn 2: " + words(9, 12)}]
    second, (_, sent, held) = turn(deaf_router, history, salt)
    every, _ = turn(pair.base_url, history, uuid.uuid4().hex)
    assert second == every and held == 0 and sent > 0
    samples = metrics(deaf_router)
    assert prom.value(samples, "phasesplit_migrations_total", reason="kv_cache_miss", stage="before_output") == 1
    state = wait_quiet(pair)
    assert all(v == (0, 0, 0, 0) for k, v in state.items() if k != "router inflight"), state


def test_the_token_worker_refuses_kv_that_counts_on_blocks_it_does_not_hold(pair, tokenizer):
    ids = tokenizer.encode(words(5, 80))
    request = pb.PrefillRequest(request_id=f"held-{uuid.uuid4().hex}", prompt_token_ids=ids,
                                sampling=pb.SamplingParams(max_tokens=4, temperature=0, cache_salt=uuid.uuid4().hex),
                                token_worker=pair.addresses("token")[0], token_cached_blocks=2)
    with worker_channel(pair.addresses("prompt")[0]) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.PromptWorkerStub(channel).Prefill(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no longer cached" in caught.value.details()
    assert (KV_PEER_FAILED, request.token_worker) in tuple(caught.value.trailing_metadata())
    state = wait_quiet(pair)
    assert all(v == (0, 0, 0, 0) for k, v in state.items() if k != "router inflight"), state
