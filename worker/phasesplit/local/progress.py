"""Each process's state on the console while local mode starts it (loading a real model takes minutes):
starting, loading the model (its weights, then the KV cache), serving; read from the process's log."""

from __future__ import annotations

import re
import threading
from typing import Callable, Iterable

from phasesplit.local.processes import ManagedProcess

LOADING = "loading model"  # what a worker logs before it loads its weights
ALLOCATING_KV = "allocating the KV cache"  # what its engine logs once the weights are in
DONE = -1  # serving: nothing more to show
KV_DETAILS = re.compile(r"\((\d+ KV blocks of \d+ tokens, device [^,)]+)")


def states(proc: ManagedProcess) -> list[str]:
    """The states `proc` went through so far, in order (a poll may come after several)."""
    reached = ["starting"]
    log = proc.log_tail(200)
    if LOADING in log:
        reached.append("loading model weights")
    if ALLOCATING_KV in log:
        reached.append("allocating the KV cache")
    if proc.ready_at is not None:
        details = KV_DETAILS.search(log)
        reached.append(f"serving ({details.group(1)})" if details else "serving")
    return reached


class Progress:
    """Prints `name (pid): state` for each state a process reaches, until `stop()`."""

    def __init__(self, processes: Callable[[], Iterable[ManagedProcess]], say: Callable[[str], None],
                 interval: float = 0.5):
        self.processes = processes
        self.say = say
        self.interval = interval
        self.shown: dict[tuple[str, int], int] = {}  # how many of its states were shown
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def start(self) -> "Progress":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def show(self) -> None:
        with self._lock:
            for proc in list(self.processes()):
                self._show(proc)

    def _show(self, proc: ManagedProcess) -> None:
        key = (proc.name, proc.pid)
        if not proc.alive() or self.shown.get(key) == DONE:
            return
        reached = states(proc)
        for state in reached[self.shown.get(key, 0):]:
            self.say(f"{proc.name} (pid {proc.pid}): {state}")
        self.shown[key] = DONE if proc.ready_at is not None else len(reached)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.show()
