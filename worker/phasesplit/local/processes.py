"""Child processes for local mode: started in their own process group, tied to the launcher's
life, checked for readiness over their real interfaces, and stopped without leaving anything behind."""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from phasesplit import parent_death
from phasesplit.local import ports

_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="spawner")


class ProcessFailed(RuntimeError):
    """A child exited, or never became ready; the message carries the end of its log."""


def _below_ephemeral_range() -> range:
    """Ports the kernel never hands out for bind(0): a port picked here is not taken by a connection or a
    gloo listener opening in the meantime (a worker binds its port only once its model is loaded)."""
    try:
        low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(10000, max(low, 10001))


def free_port(host: str = "127.0.0.1") -> int:
    for port in random.sample(_below_ephemeral_range(), 50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(count: int, host: str = "127.0.0.1", attempts: int = 50) -> int:
    """The first of `count` consecutive free ports (a tensor-parallel worker's rank r listens on port + r)."""
    for _ in range(attempts):
        first = free_port(host)
        if first + count - 1 > 65535:
            continue
        try:
            for port in range(first + 1, first + count):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind((host, port))
        except OSError:
            continue
        return first
    raise OSError(f"no {count} consecutive free ports on {host}")


class ManagedProcess:
    """One `phasesplit ...` child: its own process group (so stopping it stops all it started),
    output to a log file."""

    def __init__(self, name: str, argv: list[str], log_dir: pathlib.Path, env: dict | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self.env = env
        self.popen: subprocess.Popen | None = None
        self.ready_at: float | None = None  # time.monotonic() when it was first found ready

    def start(self) -> "ManagedProcess":
        # The death signal fires when the *thread* that forked exits: fork from one long-lived thread.
        self.popen = _SPAWNER.submit(self._spawn).result()
        return self

    def _spawn(self) -> subprocess.Popen:
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env=parent_death.child_env(self.env))

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def served_seconds(self) -> float | None:
        """How long it has been ready (None: never was)."""
        return None if self.ready_at is None else time.monotonic() - self.ready_at

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def fail(self, why: str, lines: int = 30) -> ProcessFailed:
        return ProcessFailed(f"{self.name} {why} (log {self.log_path}):\n{self.log_tail(lines)}")

    def signal(self, sig: int) -> None:
        if self.alive():
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float) -> int | None:
        """SIGTERM the group, wait up to `timeout`, then SIGKILL it. Returns the exit code."""
        if self.popen is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait()
        self._kill_leftovers()
        return self.popen.returncode

    def _kill_leftovers(self) -> None:
        # Anything the child started lives in its group; the leader's exit does not end them.
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def phasesplit_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "phasesplit.cli", *args]


def wait_grpc_serving(proc: ManagedProcess, address: str, timeout: float) -> None:
    """Polls the standard gRPC health service until it answers SERVING."""
    import grpc  # here, not above: a refused command line or port answers before gRPC loads
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if not proc.alive():
                raise proc.fail(f"exited with code {proc.popen.returncode} before it was ready")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    proc.ready_at = time.monotonic()
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise proc.fail(f"not SERVING at {address} after {timeout:.0f} s")
            time.sleep(0.2)


def wait_http_ok(proc: ManagedProcess, url: str, timeout: float) -> None:
    """Polls `url` until it answers 200 from `proc` itself: a 200 from another process listening on the
    same port (which `proc` then fails to bind) does not count."""
    port = urllib.parse.urlsplit(url).port
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise proc.fail(f"exited with code {proc.popen.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as reply:
                if reply.status == 200 and ports.listens(proc.pid, port):
                    proc.ready_at = time.monotonic()
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise proc.fail(f"{url} not answered by it with 200 after {timeout:.0f} s")
        time.sleep(0.2)
