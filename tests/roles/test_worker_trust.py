"""Workers trust only their SplitInference: the review's probes against real workers in this process.

Every work RPC needs a credential derived from the SplitInference's token, each caller reaches only
its own methods, a prompt worker's KV reaches no token worker of another SplitInference, a flood of
header-only or idle PushKV streams neither pins most of the cache nor silences the health check."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.polling import wait_for

from phasesplit import auth
from phasesplit.grpc_auth import Credential
from phasesplit.roles.server import WorkerServer, load_engine, parse_args
from phasesplit.transport.grpc_receive import PUSH_KV
from phasesplit.v1 import worker_pb2 as pb
from phasesplit.v1 import worker_pb2_grpc as pb_grpc

TOKEN, OTHER_TOKEN = "this-split-inference", "another-split-inference"
PROMPT = list(range(20, 60))
SAMPLING = pb.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def start(role: str, model_dir, token: str, *extra: str) -> WorkerServer:
    with pytest.MonkeyPatch.context() as env:
        env.setenv(auth.TOKEN_ENV, token)
        args = parse_args(["--role", role, "--model", str(model_dir), "--host", "127.0.0.1", "--port", "0",
                           "--num-kv-blocks", "64", "--max-model-len", "256", "--kv-lease", "5",
                           "--kv-transfer-timeout", "5", "--grpc-threads", "16", *extra])
        return WorkerServer(load_engine(args), args).start()


@pytest.fixture(scope="module")
def workers(tiny_model_dir):
    # The prompt worker's KV channels take the credential from the env when they open: keep it set.
    with pytest.MonkeyPatch.context() as env:
        env.setenv(auth.TOKEN_ENV, TOKEN)
        servers = {"prompt": start("prompt", tiny_model_dir, TOKEN), "token": start("token", tiny_model_dir, TOKEN),
                   "foreign": start("token", tiny_model_dir, OTHER_TOKEN)}
        yield servers
        for server in servers.values():
            server.stop()


def channel(server: WorkerServer, caller: str | None, token: str = TOKEN, port: int | None = None) -> grpc.Channel:
    plain = grpc.insecure_channel(f"127.0.0.1:{port or server.port}")
    if caller is None:
        return plain
    return grpc.intercept_channel(plain, Credential(auth.call_metadata(caller, token)))


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def prefill(stub, rid: str, token_worker: WorkerServer):
    return stub.Prefill(pb.PrefillRequest(request_id=rid, prompt_token_ids=PROMPT, sampling=SAMPLING,
                                          token_worker=f"127.0.0.1:{token_worker.port}"), timeout=30)


def header_chunk(server: WorkerServer, rid: str, tokens: int) -> bytes:
    header = pb.KVHeader(request_id=rid, layout=server.core.engine.layout.to_proto(),
                         prompt_token_ids=list(range(1, tokens + 1)))
    return pb.KVChunk(header=header).SerializeToString()


def idle_push(ch: grpc.Channel, first: bytes, release: threading.Event):
    """A PushKV stream that sends `first` (if any) and then nothing until `release` is set."""
    def requests():
        if first:
            yield first
        release.wait()
    push = ch.stream_unary(PUSH_KV, request_serializer=None, response_deserializer=pb.PushKVReply.FromString)
    return push.future(requests(), timeout=60)


def test_the_router_credential_runs_a_split_request_end_to_end(workers):
    with channel(workers["prompt"], auth.ROUTER) as p, channel(workers["token"], auth.ROUTER) as t:
        reply = prefill(pb_grpc.PromptWorkerStub(p), "trusted", workers["token"])
        events = pb_grpc.TokenWorkerStub(t).Generate(pb.GenerateRequest(request_id="trusted", sampling=SAMPLING,
                                                                         first_token=reply.first_token), timeout=30)
        assert len([reply.first_token] + [i for e in events for i in e.token_ids]) == 8


@pytest.mark.parametrize("caller,token", [(None, TOKEN), (auth.ROUTER, OTHER_TOKEN)], ids=["none", "another-token"])
def test_calls_without_this_split_inferences_credential_are_unauthenticated(workers, caller, token):
    with channel(workers["prompt"], caller, token) as p, channel(workers["token"], caller, token) as t:
        assert code_of(lambda: prefill(pb_grpc.PromptWorkerStub(p), "x", workers["token"])) \
            == grpc.StatusCode.UNAUTHENTICATED
        generate = pb_grpc.TokenWorkerStub(t).Generate(pb.GenerateRequest(request_id="x", sampling=SAMPLING),
                                                       timeout=5)
        assert code_of(lambda: list(generate)) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: pb_grpc.WorkerStub(t).Abort(pb.AbortRequest(request_id="x"), timeout=5)) \
            == grpc.StatusCode.UNAUTHENTICATED
        push = idle_push(t, header_chunk(workers["token"], "x", 32), threading.Event())
        assert code_of(lambda: push.result()) == grpc.StatusCode.UNAUTHENTICATED


def test_a_prompt_workers_credential_cannot_call_the_routers_methods(workers):
    with channel(workers["token"], auth.PROMPT_WORKER) as t, channel(workers["prompt"], auth.PROMPT_WORKER) as p:
        generate = pb_grpc.TokenWorkerStub(t).Generate(pb.GenerateRequest(request_id="x", sampling=SAMPLING),
                                                       timeout=5)
        assert code_of(lambda: list(generate)) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: prefill(pb_grpc.PromptWorkerStub(p), "x", workers["token"])) \
            == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: pb_grpc.WorkerStub(t).Load(pb.LoadRequest(), timeout=5)) \
            == grpc.StatusCode.PERMISSION_DENIED


def test_drain_is_no_rpc_and_health_answers_anyone(workers):
    with channel(workers["token"], auth.ROUTER) as t:
        drain = t.unary_unary("/phasesplit.v1.Worker/Drain", request_serializer=None, response_deserializer=None)
        assert code_of(lambda: drain(b"", timeout=5)) in (grpc.StatusCode.PERMISSION_DENIED,
                                                           grpc.StatusCode.UNIMPLEMENTED)
    server = workers["token"]
    with channel(server, None, port=server.health_port) as h:
        health = health_pb2_grpc.HealthStub(h)
        for service in ("", "liveness"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status \
                == health_pb2.HealthCheckResponse.SERVING


def test_a_token_worker_of_another_split_inference_refuses_the_kv(workers):
    foreign = workers["foreign"]
    with channel(workers["prompt"], auth.ROUTER) as p:
        with pytest.raises(grpc.RpcError) as err:
            prefill(pb_grpc.PromptWorkerStub(p), "foreign", foreign)
        assert "credential" in err.value.details()
    assert foreign.inbox.pending() == 0 and foreign.core.loop.stats.used_blocks == 0
    wait_for(lambda: workers["prompt"].core.loop.stats.used_blocks == 0, timeout=10, what="the prompt's blocks freed")


def test_header_only_pushes_cannot_keep_the_cache_from_another_caller_and_are_freed(tiny_model_dir):
    # Two callers with the same credential, told apart by their address: IPv4 and IPv6 loopback.
    token = start("token", tiny_model_dir, TOKEN, "--host", "::", "--kv-transfer-timeout", "1")
    release = threading.Event()
    try:
        total = token.core.engine.num_total_blocks
        flood = grpc.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{token.port}"),
                                       Credential(auth.call_metadata(auth.PROMPT_WORKER, TOKEN)))
        other = grpc.intercept_channel(grpc.insecure_channel(f"[::1]:{token.port}"),
                                       Credential(auth.call_metadata(auth.PROMPT_WORKER, TOKEN)))
        with flood, other:
            pushes = [idle_push(flood, header_chunk(token, f"pin-{i}", 250), release) for i in range(8)]
            wait_for(lambda: sum(f.done() for f in pushes) + token.inbox.pending() == 8, timeout=10,
                     what="each header reserved or refused")
            assert token.core.loop.stats.used_blocks > total // 2, "one caller alone may fill the cache"
            legit = idle_push(other, header_chunk(token, "legit", 250), release)
            wait_for(lambda: "legit" in token.inbox._entries or legit.done(), timeout=10, what="the other's header")
            assert not legit.done(), "the other caller's KV is taken"
            flooded = [e for e in token.inbox._entries.values() if e.request_id.startswith("pin-")
                       and e.state == "receiving"]
            assert sum(len(e.block_ids) for e in flooded) <= total // 2
            wait_for(lambda: token.core.loop.stats.used_blocks == 0, timeout=10,
                     what="the blocks of streams that sent no data freed")
    finally:
        release.set()
        token.stop()


def test_health_answers_while_idle_pushes_hold_every_work_thread(workers):
    server = workers["token"]
    release = threading.Event()
    with channel(server, auth.PROMPT_WORKER) as t, channel(server, None, port=server.health_port) as h:
        pushes = [idle_push(t, b"", release) for _ in range(80)]
        try:
            wait_for(lambda: sum(f.done() for f in pushes) >= 80 - 16, timeout=10,
                     what="the streams beyond the work threads refused")
            reply = health_pb2_grpc.HealthStub(h).Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            release.set()
