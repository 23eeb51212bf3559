"""The one thread that owns the engine: drain the command queue, then step, forever.

gRPC handler threads never touch the engine. They send commands (`call`) and receive each
request's outputs through the callback given to `submit`, which runs on the engine thread and
must only hand the output over (e.g. `queue.put`)."""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Finished:
    """Delivered instead of a StepOutput when a request ends without one (abort, engine error)."""
    request_id: str
    finish_reason: str  # "abort" | "error"
    error: str = ""
    finished: bool = True
    token_ids: tuple = ()
    text: str = ""
    num_cached_tokens: int = 0


class EngineLoop:
    def __init__(self, engine, idle_wait: float = 0.05):
        self.engine = engine
        self._idle_wait = idle_wait
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._outputs: dict[str, Callable[[Any], None]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.stats = engine.stats()  # refreshed by the engine thread after every command batch and step

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._commands.put(None)
        self._thread.join()

    # ---- called from any thread ----

    def call(self, fn: Callable[..., Any], *args) -> Future:
        """Runs fn(*args) on the engine thread between steps."""
        future: Future = Future()
        self._commands.put((fn, args, future))
        return future

    def run(self, fn: Callable[..., Any], *args, timeout: float | None = None) -> Any:
        return self.call(fn, *args).result(timeout)

    def submit(self, request_id: str, on_output: Callable[[Any], None], add: Callable[[], Any]) -> Future:
        """Registers on_output for request_id, then runs add() (an engine.add_* call)."""
        def register_and_add():
            self._outputs[request_id] = on_output
            try:
                return add()
            except BaseException:
                self._outputs.pop(request_id, None)
                raise
        return self.call(register_and_add)

    def abort(self, request_id: str) -> Future:
        """Aborts a running request; its output callback gets `Finished(.., "abort")`. Result: found."""
        def abort_now() -> bool:
            found = bool(self.engine.abort(request_id))
            self._deliver(Finished(request_id, "abort"))
            return found
        return self.call(abort_now)

    # ---- the engine thread ----

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.engine.has_unfinished())
            if not self._stop.is_set() and self.engine.has_unfinished():
                self._step()
            self.stats = self.engine.stats()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - one bad batch must not kill the worker
            log.exception("engine step failed; aborting the batch's requests")
            self._fail_all(f"engine step failed: {exc}")
            return
        for out in outputs:
            self._deliver(out)

    def _drain(self, block: bool) -> None:
        try:
            item = self._commands.get(timeout=self._idle_wait) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            fn, args, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, out) -> None:
        callback = self._outputs.get(out.request_id)
        if callback is None:
            return
        if out.finished:
            del self._outputs[out.request_id]
        callback(out)

    def _fail_all(self, error: str) -> None:
        for request_id in list(self._outputs):
            try:
                self.engine.abort(request_id)
            except Exception:  # noqa: BLE001
                log.exception("abort of %s after a failed step", request_id)
            self._deliver(Finished(request_id, "error", error))
