"""Processes start ready and stop clean: local mode on Ctrl-C/SIGTERM (and when it is killed) leaves
nothing behind; a worker drains on SIGTERM, finishing what it holds and refusing new work."""

import pathlib
import queue
import re
import signal
import subprocess
import threading
import time

import grpc
import pytest
from support.polling import poll
from support.serving import post_json, start_worker
from grpc_health.v1 import health_pb2, health_pb2_grpc

from phasesplit.local.processes import phasesplit_argv
from phasesplit.v1 import worker_pb2 as pb
from phasesplit.v1 import worker_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

MANIFEST = pathlib.Path(__file__).resolve().parents[2] / "manifests" / "examples" / "tiny-cpu.yaml"


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    return poll(lambda: {p for p in pids if alive(p)}, lambda left: not left, timeout, interval=0.2)


@pytest.fixture
def launch(tiny_model_dir, tmp_path):
    procs = []

    def start() -> tuple[subprocess.Popen, str]:
        argv = phasesplit_argv("local", str(MANIFEST), "--model", str(tiny_model_dir), "--port", "0",
                               "--drain-timeout", "10", "--log-dir", str(tmp_path / f"logs{len(procs)}"))
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                assert proc.poll() is None, f"local mode exited with {proc.returncode}"
                continue
            if match := re.search(r"OpenAI endpoint (http://\S+)/v1", line):
                return proc, match.group(1)
        raise AssertionError("local mode did not become ready")

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_local_mode_serves_then_stops_leaving_no_process(launch, sig):
    proc, base_url = launch()
    children = descendants(proc.pid)
    assert len(children) >= 3, "a router, a prompt worker and a token worker"
    status, body = post_json(f"{base_url}/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 4,
                                                            "ignore_eos": True})
    assert status == 200 and body["usage"]["completion_tokens"] == 4
    proc.send_signal(sig)
    assert proc.wait(60) == 0
    assert wait_gone(children, 5) == set()


def test_killed_launcher_takes_its_children_along(launch):
    proc, _ = launch()
    children = descendants(proc.pid)
    assert len(children) >= 3
    proc.kill()
    proc.wait()
    assert wait_gone(children, 30) == set()


def test_a_draining_worker_finishes_its_stream_refuses_new_work_and_exits_0(tiny_model_dir, tmp_path):
    proc, address = start_worker(tiny_model_dir, tmp_path, "mixed", "--drain-timeout", "30",
                                 "--max-model-len", "2048", "--num-kv-blocks", "256")
    channel = grpc.insecure_channel(address)
    try:
        sampling = pb.SamplingParams(temperature=0, top_p=1, max_tokens=1200, ignore_eos=True)
        stream = pb_grpc.TokenWorkerStub(channel).Generate(
            pb.GenerateRequest(request_id="long-1", sampling=sampling, prompt_token_ids=[5, 6, 7]), timeout=120)
        first = next(stream)
        proc.signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as err:
            list(pb_grpc.TokenWorkerStub(channel).Generate(
                pb.GenerateRequest(request_id="late-1", sampling=sampling, prompt_token_ids=[5, 6, 7]), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        load = pb_grpc.WorkerStub(channel).Load(pb.LoadRequest(), timeout=5)
        assert load.draining and load.running_requests == 1, "the stream is still running while it drains"
        events = [first, *stream]
        assert events[-1].finish_reason == "length"
        assert sum(len(e.token_ids) for e in events) == 1200
        assert proc.popen.wait(30) == 0
    finally:
        channel.close()
        proc.stop(5)
