"""Fixtures: KV servers on 127.0.0.1 ephemeral ports, and a check that no thread outlives a test."""

from __future__ import annotations

import threading
import time

import pytest
from support.kv_sink import KVServer


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
