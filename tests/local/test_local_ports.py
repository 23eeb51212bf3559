"""`phasesplit local` cannot lie about readiness: its router's port is checked before anything loads,
`/health` counts only when its own router answers, a router that keeps failing is not restarted
forever, and the API key can be required. Real processes; waits on their output and exit."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
import yaml
from support.examples import split_inference

from phasesplit.local.keys import notice as api_key_notice
from phasesplit.local.plan import validate_manifest
from phasesplit.local.processes import ManagedProcess, ProcessFailed, free_port, phasesplit_argv, wait_http_ok

NO_WORKERS = {"pools": {pool: {"replicas": 0, "autoscaling": {"minReplicas": 0, "maxReplicas": 1}}
                        for pool in ("prompt", "token")}, "autoscaling": {"mode": "none"}}


def write_manifest(tmp_path, spec: dict, name: str = "si.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(split_inference("ports", spec=spec)))
    return path


def environment() -> dict:
    return {k: v for k, v in os.environ.items() if k != "PHASESPLIT_API_KEY"}


class Launcher:
    """`phasesplit local` as a child process, its console read line by line."""

    def __init__(self, *args: str):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(phasesplit_argv("local", *args), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=environment())
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout] + [self.lines.put(None)],
                         daemon=True).start()

    def wait_line(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"exited with {self.proc.wait()} before {pattern!r}:\n{''.join(self.seen)}")
            self.seen.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"no line {pattern!r} in {timeout} s:\n{''.join(self.seen)}")

    def wait_exit(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout)
        self.elapsed = time.monotonic() - self.started
        while (line := self.lines.get(timeout=10)) is not None:
            self.seen.append(line)
        return code

    @property
    def output(self) -> str:
        return "".join(self.seen)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)


@pytest.fixture
def launchers():
    started: list[Launcher] = []
    yield lambda *args: started.append(Launcher(*args)) or started[-1]
    for launcher in started:
        launcher.stop()


@pytest.fixture
def other_router(tiny_model_dir, tmp_path):
    """A `phasesplit router` that is not ours, on a port of its own (what another `phasesplit local` runs)."""
    procs = []

    def start(port: int) -> ManagedProcess:
        argv = phasesplit_argv("router", "--model", str(tiny_model_dir), "--host", "127.0.0.1", "--port", str(port),
                               "--pools", "prompt,token")
        proc = ManagedProcess(f"other-router-{len(procs)}", argv, tmp_path).start()
        procs.append(proc)
        wait_http_ok(proc, f"http://127.0.0.1:{port}/health", 60)
        return proc

    yield start
    for proc in procs:
        proc.stop(10)


def test_a_port_another_router_serves_fails_at_once_naming_the_port_and_the_flag(
        tiny_model_dir, tmp_path, other_router, launchers):
    port = free_port()
    other = other_router(port)
    launcher = launchers(str(write_manifest(tmp_path, NO_WORKERS)), "--model", str(tiny_model_dir),
                         "--port", str(port), "--log-dir", str(tmp_path / "logs"))
    assert launcher.wait_exit() == 2
    assert launcher.output.count("\n") == 1 and "Traceback" not in launcher.output
    assert f"port {port} on 127.0.0.1 is not free" in launcher.output
    assert f"a phasesplit router answers there (held by pid {other.pid})" in launcher.output
    assert "set another with --port" in launcher.output
    assert launcher.elapsed < 5.0, launcher.elapsed   # Python's start and the imports; nothing loads
    assert not (tmp_path / "logs").exists(), "nothing was started"


def test_a_port_another_program_holds_names_the_spec_field(tiny_model_dir, tmp_path, launchers):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        manifest = write_manifest(tmp_path, {**NO_WORKERS, "router": {"service": {"port": port}}})
        launcher = launchers(str(manifest), "--model", str(tiny_model_dir))
        assert launcher.wait_exit() == 2
    assert launcher.output.count("\n") == 1 and "Traceback" not in launcher.output
    assert f"port {port} on 127.0.0.1 is not free" in launcher.output
    assert f"held by pid {os.getpid()}" in launcher.output and "router answers" not in launcher.output
    assert "set another with spec.router.service.port" in launcher.output


def test_health_counts_only_from_the_process_that_listens(tiny_model_dir, tmp_path, other_router):
    port = free_port()
    other_router(port)
    impostor = ManagedProcess("sleeper", ["sleep", "30"], tmp_path).start()
    try:
        with pytest.raises(ProcessFailed, match="not answered by it"):
            wait_http_ok(impostor, f"http://127.0.0.1:{port}/health", 1.5)
    finally:
        impostor.stop(5)


def test_a_router_that_keeps_failing_stops_local_mode_with_its_log(tiny_model_dir, tmp_path, launchers):
    launcher = launchers(str(write_manifest(tmp_path, NO_WORKERS)), "--model", str(tiny_model_dir), "--port", "0",
                         "--log-dir", str(tmp_path / "logs"))
    router_pid = int(launcher.wait_line(r"router \(pid (\d+)\): serving").group(1))
    port = int(launcher.wait_line(r"OpenAI endpoint http://127.0.0.1:(\d+)/v1").group(1))
    os.kill(router_pid, signal.SIGKILL)
    wait_gone(router_pid)
    with socket.socket() as held:   # another program takes the port: every new router fails to bind it
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", port))
        held.listen()
        assert launcher.wait_exit() == 1
    assert "router failed 3 times in a row" in launcher.output and "not restarting it" in launcher.output
    assert "address already in use" in launcher.output.lower()
    assert launcher.output.count("starting a new one") >= 2, launcher.output


def wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and _state(pid) != "Z":
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def get(url: str, key: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as reply:
        return reply.code


def test_the_api_key_from_a_file_is_required(tiny_model_dir, tmp_path, launchers):
    (tmp_path / "key").write_text("s3cret\n")
    manifest = write_manifest(tmp_path, {**NO_WORKERS, "router": {"apiKeySecret": {"name": "router-key"}}})
    launcher = launchers(str(manifest), "--model", str(tiny_model_dir), "--port", "0",
                         "--api-key-file", str(tmp_path / "key"))
    launcher.wait_line("the router requires the API key")
    base = launcher.wait_line(r"OpenAI endpoint (http://\S+)/v1").group(1)
    assert get(f"{base}/v1/models") == 401
    assert get(f"{base}/v1/models", "wrong") == 401
    assert get(f"{base}/v1/models", "s3cret") == 200
    assert "warning" not in launcher.output


def test_an_api_key_secret_local_mode_cannot_read_is_warned_about():
    doc = validate_manifest(split_inference("k", spec={"router": {"apiKeySecret": {"name": "router-key"}}}))
    notice = api_key_notice(doc.spec, None)
    assert notice.startswith("warning: spec.router.apiKeySecret (Secret router-key, key api-key) is not read")
    assert "--api-key-file" in notice
    assert api_key_notice(doc.spec, "k").startswith("the router requires")
    assert api_key_notice(validate_manifest(split_inference("k")).spec, None) is None


def test_progress_shows_each_worker_loading_then_serving(tiny_model_dir, tmp_path, launchers):
    launcher = launchers(str(write_manifest(tmp_path, {})), "--model", str(tiny_model_dir), "--port", "0")
    launcher.wait_line(r"OpenAI endpoint")
    for name in ("prompt-1", "token-2"):
        assert re.search(rf"{name} \(pid \d+\): loading model", launcher.output), launcher.output
        assert re.search(rf"{name} \(pid \d+\): allocating the KV cache", launcher.output), launcher.output
        assert re.search(rf"{name} \(pid \d+\): serving \(\d+ KV blocks of 16 tokens, device cpu\)",
                         launcher.output), launcher.output
    assert re.search(r"router \(pid \d+\): serving", launcher.output)


def test_in_json_mode_local_modes_own_lines_are_json_too(tiny_model_dir, tmp_path, launchers):
    launcher = launchers(str(write_manifest(tmp_path, {})), "--model", str(tiny_model_dir), "--port", "0",
                         "--log-format", "json", "--drain-timeout", "5")  # stopped within the fixture's wait
    ready = launcher.wait_line(r"OpenAI endpoint")
    line = json.loads(ready.string)
    assert line["message"].startswith("phasesplit local: ready") and line["level"] == "INFO"
