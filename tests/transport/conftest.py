"""Fixtures: KV servers on 127.0.0.1 ephemeral ports for every backend, and a check that no thread outlives a test."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
from support.kv_sink import KVServer, ReceiverServer

from phasesplit.transport import make_transport

# The backends the contract suite runs over; "gloo" is the nccl backend with CPU caches.
BACKENDS = ("grpc", "gloo", "tcp")
PAIR_BACKENDS = ("gloo", "tcp")  # gRPC control, a per-pair data path


@dataclass
class Backend:
    name: str
    servers: list

    def serve(self, sink, timeout=10.0):
        server = KVServer(sink, timeout=timeout) if self.name == "grpc" else \
            ReceiverServer(sink, "nccl" if self.name == "gloo" else self.name, timeout=timeout)
        self.servers.append(server)
        return server

    def transport(self, timeout=10.0, **options):
        if self.name == "grpc":
            return make_transport("grpc", timeout=timeout, **options)
        return make_transport("nccl" if self.name == "gloo" else self.name, device="cpu", timeout=timeout, **options)


def _backend(request):
    backend = Backend(request.param, [])
    yield backend
    for server in backend.servers:
        server.stop()


backend = pytest.fixture(params=BACKENDS)(_backend)
pair_backend = pytest.fixture(params=PAIR_BACKENDS)(_backend)
backend_tcp = pytest.fixture(params=("tcp",))(_backend)


@pytest.fixture
def serve():
    servers = []

    def start(sink, **kwargs):
        servers.append(KVServer(sink, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def no_thread_leaks():
    before = {t.ident for t in threading.enumerate()}
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        extra = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
        if not extra:
            return
        time.sleep(0.05)
    pytest.fail(f"threads left running: {[t.name for t in extra]}")
