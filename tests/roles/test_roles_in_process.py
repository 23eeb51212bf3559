"""The prompt and token roles in this process, each on a tiny engine, over real gRPC: the split path
gives the same tokens as one engine alone, aborts free KV on both sides, a token worker that
refuses KV for an aborted request id says why in its log and leaks nothing, and a prompt that waits
in the prompt worker's queue longer than the KV timeout still moves its KV."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import grpc
import pytest
from support.polling import wait_for

from phasesplit.engine.engine import EngineConfig, LLMEngine, SamplingParams
from phasesplit.engine.tokenizer import read_tokenizer_files, tokenizer_digest
from phasesplit.roles.server import WorkerServer, load_engine, parse_args
from phasesplit.v1 import worker_pb2 as pb
from phasesplit.v1 import worker_pb2_grpc as pb_grpc

PROMPT = list(range(20, 60))


def start(role: str, model_dir, *flags: str) -> WorkerServer:
    args = parse_args(["--role", role, "--model", str(model_dir), "--served-model-name", "tiny", "--host", "127.0.0.1",
                       "--port", "0", "--num-kv-blocks", "64", "--max-model-len", "256", "--kv-lease", "5",
                       "--kv-transfer-timeout", "5", "--grpc-threads", "16", *flags])
    return WorkerServer(load_engine(args), args).start()


@contextlib.contextmanager
def split_pair(model_dir, prompt_flags: tuple[str, ...] = (), token_flags: tuple[str, ...] = ()):
    """A prompt and a token worker in this process: (prompt, token, prompt stub, token stub)."""
    servers = start("prompt", model_dir, *prompt_flags), start("token", model_dir, *token_flags)
    channels = [grpc.insecure_channel(f"127.0.0.1:{s.port}") for s in servers]
    try:
        yield (*servers, pb_grpc.PromptWorkerStub(channels[0]), pb_grpc.TokenWorkerStub(channels[1]))
    finally:
        for channel in channels:
            channel.close()
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def roles(tiny_model_dir):
    with split_pair(tiny_model_dir) as pair:
        yield pair


def alone(model_dir, ids: list[int], params: SamplingParams) -> list[int]:
    engine = LLMEngine(EngineConfig(str(model_dir), num_kv_blocks=64, max_model_len=256))
    engine.add_request("alone", ids, params)
    out = []
    while engine.has_unfinished():
        for step in engine.step():
            out += step.token_ids
    return out


def split_run(roles, rid: str, ids: list[int], sampling: pb.SamplingParams, token_cached_blocks: int = 0) -> list[int]:
    prompt, token, prompt_stub, token_stub = roles
    reply = prompt_stub.Prefill(pb.PrefillRequest(request_id=rid, prompt_token_ids=ids, sampling=sampling,
                                                  token_worker=f"127.0.0.1:{token.port}",
                                                  token_cached_blocks=token_cached_blocks), timeout=30)
    events = token_stub.Generate(pb.GenerateRequest(request_id=rid, sampling=sampling,
                                                    first_token=reply.first_token), timeout=30)
    return [reply.first_token] + [t for e in events for t in e.token_ids]


def used_blocks(server: WorkerServer) -> int:
    return server.core.loop.stats.used_blocks


@pytest.mark.parametrize("seed", [None, 7], ids=["greedy", "seeded"])
def test_split_roles_give_the_tokens_of_one_engine_and_free_every_block(roles, tiny_model_dir, seed):
    params = SamplingParams(temperature=0.0 if seed is None else 1.0, seed=seed, max_tokens=24, ignore_eos=True)
    sampling = pb.SamplingParams(temperature=params.temperature, max_tokens=24, ignore_eos=True)
    if seed is not None:
        sampling.seed = seed
    assert split_run(roles, f"same-{seed}", PROMPT, sampling) == alone(tiny_model_dir, PROMPT, params)
    wait_for(lambda: used_blocks(roles[0]) == used_blocks(roles[1]) == 0, timeout=5, what="every block free")


class PieceLog:
    """Wraps a prompt worker's transport: which blocks of which layer each send_layer queued, in order."""

    def __init__(self, transport):
        self.transport, self.pieces = transport, []

    def open(self, addr, header):
        sender = self.transport.open(addr, header)
        send_layer = sender.send_layer

        def logged(layer, k, v, block_ids=None, first=0):
            self.pieces.append((layer, first, len(block_ids)))
            send_layer(layer, k, v, block_ids, first)
        sender.send_layer = logged
        return sender


@pytest.mark.parametrize("backend", ["grpc", "tcp", "nccl"])
def test_a_chunked_prefill_sends_each_chunks_kv_as_it_is_computed(tiny_model_dir, backend):
    """A 40-token prompt on a prompt worker whose step budget is one 16-token block: three chunks, each
    chunk's blocks of every layer queued right after that layer of that chunk ran; the token worker
    commits once the last piece arrived, and the tokens are one engine's. Sent again, the prompt's
    cached blocks go with its one computed chunk."""
    flags = ("--max-num-batched-tokens", "16", "--kv-backend", backend)
    with split_pair(tiny_model_dir, flags, flags) as roles:
        prompt, token = roles[:2]
        log = prompt.prompt.transport = PieceLog(prompt.prompt.transport)
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        sampling = pb.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        expected = alone(tiny_model_dir, PROMPT, params)
        assert split_run(roles, "chunked", PROMPT, sampling) == expected
        layers = prompt.core.engine.layout.num_layers
        assert log.pieces == [(layer, first, 1) for first in range(3) for layer in range(layers)]
        # the same prompt again: its first two blocks come from the prompt worker's prefix cache, and
        # go with the one chunk computed (the token worker needs every block)
        log.pieces.clear()
        assert split_run(roles, "chunked-again", PROMPT, sampling) == expected
        assert log.pieces == [(layer, 0, 3) for layer in range(layers)]
        wait_for(lambda: used_blocks(prompt) == used_blocks(token) == 0, timeout=5, what="every block free")


def test_a_token_worker_computes_a_prompt_itself_when_the_router_asks(roles, tiny_model_dir):
    """Conditional disaggregation: Generate with the prompt's ids on a token worker prefills it there."""
    _, token, _, token_stub = roles
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    sampling = pb.SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    events = token_stub.Generate(pb.GenerateRequest(request_id="local", sampling=sampling, prompt_token_ids=PROMPT),
                                 timeout=30)
    assert [t for e in events for t in e.token_ids] == alone(tiny_model_dir, PROMPT, params)
    wait_for(lambda: used_blocks(token) == 0, timeout=5, what="every block free")


def test_kv_for_an_aborted_request_id_is_refused_with_a_reason_in_the_log(roles, caplog):
    prompt, token, prompt_stub, _ = roles
    with grpc.insecure_channel(f"127.0.0.1:{token.port}") as channel:
        assert not pb_grpc.WorkerStub(channel).Abort(pb.AbortRequest(request_id="gone"), timeout=5).found
    sampling = pb.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    with caplog.at_level(logging.WARNING, logger="phasesplit.roles.kv_inbox"), pytest.raises(grpc.RpcError) as err:
        prompt_stub.Prefill(pb.PrefillRequest(request_id="gone", prompt_token_ids=PROMPT, sampling=sampling,
                                              token_worker=f"127.0.0.1:{token.port}"), timeout=30)
    assert err.value.code() == grpc.StatusCode.ABORTED and "aborted" in err.value.details()
    assert any("gone" in r.getMessage() and "refus" in r.getMessage() for r in caplog.records)
    wait_for(lambda: used_blocks(prompt) == used_blocks(token) == 0, timeout=5, what="every block free")


def test_every_worker_serves_its_tokenizer_files_and_names_them_by_digest(roles, tiny_model_dir):
    on_disk = read_tokenizer_files(tiny_model_dir)
    for server in roles[:2]:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.WorkerStub(channel)
            files: dict[str, bytes] = {}
            for chunk in stub.TokenizerFiles(pb.TokenizerFilesRequest(), timeout=10):
                files[chunk.name] = files.get(chunk.name, b"") + chunk.data
            assert files == on_disk and "tokenizer.json" in files
            assert stub.Info(pb.InfoRequest(), timeout=10).tokenizer_digest == tokenizer_digest(on_disk)


def test_the_workers_lines_about_a_request_carry_the_routers_request_id(roles, caplog):
    prompt, token, prompt_stub, token_stub = roles
    sampling = pb.SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    metadata = (("x-request-id", "client-trace-7"),)
    with caplog.at_level(logging.INFO, logger="phasesplit.roles"):
        reply = prompt_stub.Prefill(pb.PrefillRequest(request_id="traced", prompt_token_ids=PROMPT, sampling=sampling,
                                                      token_worker=f"127.0.0.1:{token.port}"), timeout=30,
                                    metadata=metadata)
        list(token_stub.Generate(pb.GenerateRequest(request_id="traced", sampling=sampling,
                                                    first_token=reply.first_token), timeout=30, metadata=metadata))
        split_run(roles, "untraced", PROMPT, sampling)
    traced = [r for r in caplog.records if getattr(r, "request_id", None) == "client-trace-7"]
    assert {r.name for r in traced} == {"phasesplit.roles.prompt", "phasesplit.roles.token"}
    assert all("request traced: " in r.getMessage() for r in traced)
    untraced = [r for r in caplog.records if "request untraced: " in r.getMessage()]
    assert len(untraced) == 2 and all(r.request_id == "untraced" for r in untraced)


@pytest.mark.parametrize(("backend", "layerwise"), [("grpc", True), ("tcp", True), ("nccl", True), ("grpc", False)],
                         ids=["grpc", "tcp", "nccl", "grpc-serialized"])
def test_chunks_inside_the_blocks_the_token_worker_holds_send_nothing(tiny_model_dir, backend, layerwise):
    """The prompt worker computes the whole prompt (its prefix cache off), one block per chunk; the token
    worker holds the prompt's first two blocks from its last run: only the third block moves (layer by layer
    with its chunk, or after the prompt phase), and the tokens are one engine's."""
    flags = ("--max-num-batched-tokens", "16", "--kv-backend", backend, *(() if layerwise else ("--no-layerwise",)))
    with split_pair(tiny_model_dir, (*flags, "--no-prefix-caching"), flags) as roles:
        prompt, token = roles[:2]
        log = prompt.prompt.transport = PieceLog(prompt.prompt.transport)
        sampling = pb.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        expected = alone(tiny_model_dir, PROMPT, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
        assert split_run(roles, "all-blocks", PROMPT, sampling) == expected
        log.pieces.clear()
        assert split_run(roles, "held-blocks", PROMPT, sampling, token_cached_blocks=2) == expected
        assert log.pieces == [(layer, 2, 1) for layer in range(prompt.core.engine.layout.num_layers)]
        wait_for(lambda: used_blocks(prompt) == used_blocks(token) == 0, timeout=5, what="every block free")


@pytest.mark.parametrize("backend", ["grpc", "tcp", "nccl"])
def test_a_prompt_queued_longer_than_the_kv_timeout_still_moves_its_kv(tiny_model_dir, backend, caplog):
    """The prompt worker's engine is busy for three KV timeouts before it takes the prompt: the token
    worker hears of the transfer only with its first layer, so nothing there times out meanwhile."""
    timeout = 1.0
    flags = ("--kv-backend", backend, "--kv-transfer-timeout", str(timeout))
    with split_pair(tiny_model_dir, flags, flags) as roles:
        prompt, token, prompt_stub, token_stub = roles
        sampling = pb.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        busy = threading.Event()
        prompt.core.loop.call(busy.wait)
        with caplog.at_level(logging.INFO, logger="phasesplit.roles.prompt"):
            reply = prompt_stub.Prefill.future(pb.PrefillRequest(
                request_id="queued", prompt_token_ids=PROMPT, sampling=sampling,
                token_worker=f"127.0.0.1:{token.port}"), timeout=30)
            wait_for(lambda: any("request queued: prefill" in r.getMessage() for r in caplog.records),
                     timeout=10, what="the prefill queued on the prompt worker")
        time.sleep(3 * timeout)   # what is under test: time passing while the prompt waits
        busy.set()
        first = reply.result().first_token
        events = token_stub.Generate(pb.GenerateRequest(request_id="queued", sampling=sampling, first_token=first),
                                     timeout=30)
        expected = alone(tiny_model_dir, PROMPT, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
        assert [first] + [t for e in events for t in e.token_ids] == expected
        wait_for(lambda: used_blocks(prompt) == used_blocks(token) == 0, timeout=5, what="every block free")
