"""Split serving with `--kv-backend nccl` (gloo on CPU): real worker processes driven over their gRPC API.

One prompt worker and two token workers on the process-group backend, one mixed worker as the
reference: greedy tokens must match token for token, no worker may keep KV blocks afterwards,
and a token worker killed during a transfer must not take the prompt worker down with it."""

from __future__ import annotations

import pathlib
import queue
import random
import re
import signal
import subprocess
import threading
import time
from concurrent import futures

import grpc
import pytest

from phasesplit.v1 import worker_pb2 as pb
from phasesplit.v1 import worker_pb2_grpc as pb_grpc

from support.polling import poll
from support.serving import post_json, start_worker, worker_load
from support.words import WORDS

from phasesplit.local.processes import phasesplit_argv

pytestmark = pytest.mark.slow

TIMEOUT = 5.0  # --kv-transfer-timeout of every worker here
NCCL = ("--kv-backend", "nccl", "--kv-transfer-timeout", str(TIMEOUT))
MANIFEST = pathlib.Path(__file__).resolve().parents[2] / "manifests" / "examples" / "tiny-cpu.yaml"  # grpc


@pytest.fixture(scope="module")
def workers(tiny_model_dir, tmp_path_factory):
    """{name: (process, address)} for prompt, token_a, token_b (nccl backend) and mixed (grpc)."""
    logs = tmp_path_factory.mktemp("nccl-serving-logs")
    specs = {"prompt": ("prompt", *NCCL), "token_a": ("token", *NCCL), "token_b": ("token", *NCCL),
             "mixed": ("mixed",)}
    with futures.ThreadPoolExecutor(len(specs)) as pool:
        jobs = {name: pool.submit(start_worker, tiny_model_dir, logs / name, *args) for name, args in specs.items()}
    started = {name: job.result() for name, job in jobs.items() if job.exception() is None}
    try:
        for job in jobs.values():
            job.result()
        yield started
    finally:
        for proc, _ in started.values():
            proc.stop(10)


def tokenize(tiny_model_dir, n: int, seed: int) -> list[list[int]]:
    from phasesplit.engine.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(tiny_model_dir)
    rng = random.Random(seed)
    return [tok.encode(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 120)))) for _ in range(n)]


def greedy(max_tokens: int) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=max_tokens, ignore_eos=True)


def split_generate(prompt_addr: str, token_addr: str, rid: str, ids: list[int], max_tokens: int,
                   timeout: float = 60) -> list[int]:
    with grpc.insecure_channel(prompt_addr) as pc, grpc.insecure_channel(token_addr) as tc:
        reply = pb_grpc.PromptWorkerStub(pc).Prefill(
            pb.PrefillRequest(request_id=rid, prompt_token_ids=ids, sampling=greedy(max_tokens),
                              token_worker=token_addr), timeout=timeout)
        tokens = [reply.first_token]
        if reply.finish_reason:
            return tokens
        events = pb_grpc.TokenWorkerStub(tc).Generate(
            pb.GenerateRequest(request_id=rid, sampling=greedy(max_tokens), first_token=reply.first_token),
            timeout=timeout)
        for event in events:
            tokens += list(event.token_ids)
    return tokens


def mixed_generate(addr: str, rid: str, ids: list[int], max_tokens: int) -> list[int]:
    with grpc.insecure_channel(addr) as channel:
        events = pb_grpc.TokenWorkerStub(channel).Generate(
            pb.GenerateRequest(request_id=rid, sampling=greedy(max_tokens), prompt_token_ids=ids), timeout=60)
        return [t for event in events for t in event.token_ids]


def wait_no_kv(addresses: list[str], timeout: float = 15.0) -> dict[str, tuple]:
    """Polls until no worker holds KV blocks or pending transfers; returns what each holds at the end."""
    def held() -> dict[str, tuple]:
        return {addr: (load.kv_blocks_used, load.pending_transfers, load.running_requests)
                for addr, load in ((a, worker_load(a)) for a in addresses)}
    return poll(held, lambda h: all(v == (0, 0, 0) for v in h.values()), timeout)


def test_concurrent_greedy_requests_match_a_mixed_worker_and_free_every_block(workers, tiny_model_dir):
    (_, prompt), (_, token_a), (_, token_b), (_, mixed) = (workers[n] for n in ("prompt", "token_a", "token_b",
                                                                                 "mixed"))
    prompts = tokenize(tiny_model_dir, 16, seed=3)
    lengths = [4 + i % 9 for i in range(len(prompts))]
    with futures.ThreadPoolExecutor(16) as pool:
        split = list(pool.map(lambda i: split_generate(prompt, (token_a, token_b)[i % 2], f"s{i}", prompts[i],
                                                         lengths[i]), range(len(prompts))))
        want = list(pool.map(lambda i: mixed_generate(mixed, f"m{i}", prompts[i], lengths[i]),
                             range(len(prompts))))
    for i, (got, ref) in enumerate(zip(split, want)):
        assert got == ref, f"request {i}: split {got} != mixed {ref}"
        assert len(got) == lengths[i]
    assert wait_no_kv([prompt, token_a, token_b, mixed]) == {a: (0, 0, 0) for a in (prompt, token_a, token_b, mixed)}


def test_a_killed_token_worker_leaves_the_prompt_worker_serving(workers, tiny_model_dir):
    (_, prompt), (victim, token_a), (_, token_b), (_, mixed) = (workers[n] for n in ("prompt", "token_a",
                                                                                      "token_b", "mixed"))
    ids = tokenize(tiny_model_dir, 2, seed=11)
    split_generate(prompt, token_a, "warm", ids[0], 4)  # the prompt/token_a group now exists

    victim.signal(signal.SIGSTOP)  # frozen mid-transfer: only timeouts can notice ...
    outcome: dict = {}

    def doomed():
        started = time.monotonic()
        try:
            split_generate(prompt, token_a, "doomed", ids[1], 8)
            outcome["error"] = None
        except grpc.RpcError as exc:
            outcome["error"] = exc.code()
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=doomed)
    thread.start()
    time.sleep(1.0)
    victim.signal(signal.SIGKILL)  # ... then gone for good
    thread.join(3 * TIMEOUT)
    assert not thread.is_alive(), "Prefill to a killed token worker hung"
    assert outcome["error"] is not None, "a transfer to a dead token worker cannot succeed"
    assert outcome["seconds"] < 2 * TIMEOUT + 2

    # The next request, to a healthy token worker, is served and exact.
    got = split_generate(prompt, token_b, "after", ids[1], 8)
    assert got == mixed_generate(mixed, "after-ref", ids[1], 8)
    assert wait_no_kv([prompt, token_b]) == {prompt: (0, 0, 0), token_b: (0, 0, 0)}


def cmdline(pid: int) -> list[str]:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def test_local_mode_kv_backend_flag_serves_over_the_process_group(workers, tiny_model_dir, tmp_path):
    """`phasesplit local FILE --kv-backend nccl` on a CPU machine: the spec says grpc and requests no
    GPU; the flag wins, the workers run the nccl backend (gloo), and greedy answers match a mixed worker."""
    from phasesplit.engine.tokenizer import Tokenizer
    argv = phasesplit_argv("local", str(MANIFEST), "--model", str(tiny_model_dir), "--port", "0",
                           "--kv-backend", "nccl", "--drain-timeout", "5", "--log-dir", str(tmp_path / "logs"))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()
    try:
        base_url, seen = None, []
        deadline = time.monotonic() + 180
        while base_url is None and time.monotonic() < deadline:
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                assert proc.poll() is None, f"local mode exited with {proc.returncode}: {''.join(seen)}"
                continue
            if match := re.search(r"OpenAI endpoint (http://\S+)/v1", seen[-1]):
                base_url = match.group(1)
        assert base_url, "local mode did not become ready"
        worker_argvs = [a for pid in _children(proc.pid) if "worker" in (a := cmdline(pid))]
        assert len(worker_argvs) == 2 and all(a[a.index("--kv-backend") + 1] == "nccl" for a in worker_argvs)

        tok = Tokenizer.from_dir(tiny_model_dir)
        rng = random.Random(5)
        prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 80))) for _ in range(6)]

        def complete(prompt):
            status, body = post_json(f"{base_url}/v1/completions", {
                "model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True})
            assert status == 200, body
            return body["choices"][0]["text"]

        with futures.ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(complete, prompts))
        mixed = workers["mixed"][1]
        for i, prompt in enumerate(prompts):
            want = tok.decode(mixed_generate(mixed, f"local-ref-{i}", tok.encode(prompt), 6))
            assert got[i] == want, f"prompt {i}: local nccl {got[i]!r} != mixed {want!r}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
            reader.join(5)
            output = "".join(seen + list(lines.queue))
            assert code == 0, f"local mode exited with {code} after SIGTERM:\n{output}"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _children(pid: int) -> list[int]:
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def test_workers_holding_kv_groups_exit_cleanly_on_sigterm(tiny_model_dir, tmp_path):
    """Both ends of a KV group stop (as local mode and a rollout stop them: at once) and exit 0; a
    gloo group left alive makes the process abort at exit."""
    prompt, prompt_addr = start_worker(tiny_model_dir, tmp_path / "prompt", "prompt", *NCCL)
    token, token_addr = start_worker(tiny_model_dir, tmp_path / "token", "token", *NCCL)
    try:
        ids = tokenize(tiny_model_dir, 1, seed=7)[0]
        assert len(split_generate(prompt_addr, token_addr, "clean-exit", ids, 4)) == 4
        for proc in (prompt, token):
            proc.signal(signal.SIGTERM)
        assert prompt.popen.wait(30) == 0, prompt.log_tail()
        assert token.popen.wait(30) == 0, token.log_tail()
    finally:
        token.stop(5)
        prompt.stop(5)
