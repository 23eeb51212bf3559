"""What every role shares: the engine thread, the drain state and the count of requests in flight."""

from __future__ import annotations

import collections
import contextlib
import threading
import time

import grpc

from phasesplit.control.worker_config import WorkerConfig
from phasesplit.roles.engine_loop import EngineLoop


class WorkerCore:
    def __init__(self, engine, settings: WorkerConfig):  # settings.served_model_name: resolved
        self.engine = engine
        self.settings = settings
        self.loop = EngineLoop(engine)
        self.draining = threading.Event()
        self._inflight = 0
        self._idle = threading.Condition()
        self._streams_ended: collections.Counter[str] = collections.Counter()   # Generate streams, by how they ended
        self.on_drain = []  # callables run once when draining starts (e.g. health NOT_SERVING)

    @property
    def role(self) -> str:
        return self.settings.role

    @property
    def inflight(self) -> int:
        return self._inflight

    def refuse_if_draining(self, context: grpc.ServicerContext) -> None:
        if self.draining.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "worker is draining and takes no new requests")

    @contextlib.contextmanager
    def tracked(self):
        """Counts one request in flight for as long as the block runs."""
        with self._idle:
            self._inflight += 1
        try:
            yield
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def count_stream_end(self, how: str) -> None:
        """A Generate stream ended: its finish reason, or "cancelled" when the client went away first."""
        with self._idle:
            self._streams_ended[how] += 1

    def streams_ended(self) -> dict[str, int]:
        with self._idle:
            return dict(self._streams_ended)

    def drain(self) -> None:
        if self.draining.is_set():
            return
        self.draining.set()
        for fn in self.on_drain:
            fn()

    def wait_idle(self, timeout: float, extra_busy=lambda: 0) -> bool:
        """Waits until no request is in flight (and extra_busy() is 0); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._inflight or extra_busy():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.1))
        return True
