"""The processes of a tensor-parallel group: one per rank (one per GPU), started and supervised
together. A rank that dies takes the others down, so the caller (a pod's worker) exits nonzero
and is restarted as a whole; nothing half-alive keeps serving."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
from collections.abc import Callable

import torch

from phasesplit.engine.parallel import TensorParallel, init_tensor_parallel
from phasesplit.parent_death import die_with_parent

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 10.0


def rank_device(device: str, rank: int) -> str:
    """Rank r's device: `cuda` means GPU r; an explicit `cuda:N` offsets by N; CPU is shared."""
    d = torch.device(device)
    if d.type != "cuda":
        return device
    return f"cuda:{(d.index or 0) + rank}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _rank_main(rank: int, size: int, master: str, device: str, fn: Callable, args: tuple, supervisor: int) -> None:
    die_with_parent(supervisor, signal.SIGKILL)
    if rank > 0:  # the supervisor forwards SIGTERM to rank 0, which stops the others when it has drained
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    device = rank_device(device, rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    tp = init_tensor_parallel(rank, size, master, device)
    code = fn(tp, device, *args)
    raise SystemExit(code or 0)


class RankGroup:
    """`fn(tp, device, *args)` in `size` processes; rank 0's return value is the group's exit code."""

    def __init__(self, size: int, fn: Callable, args: tuple = (), device: str = "cpu"):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"tensor_parallel_size: got {size!r}, must be an integer >= 1")
        if torch.device(device).type == "cuda":
            first = torch.device(device).index or 0
            if first + size > torch.cuda.device_count():
                raise ValueError(f"tensor_parallel_size: {size} ranks from {device} need GPUs {first}.."
                                 f"{first + size - 1}, this machine has {torch.cuda.device_count()}")
        ctx = multiprocessing.get_context("spawn")
        master = f"127.0.0.1:{free_port()}"
        self.procs = [ctx.Process(target=_rank_main, args=(r, size, master, device, fn, args, os.getpid()),
                                  name=f"rank{r}", daemon=False) for r in range(size)]

    def start(self) -> RankGroup:
        for p in self.procs:
            p.start()
        return self

    def terminate(self) -> None:
        """Asks rank 0 to finish (it stops the other ranks when it is done)."""
        if self.procs[0].is_alive():
            os.kill(self.procs[0].pid, signal.SIGTERM)

    def wait(self) -> int:
        """Until rank 0 exits, or any rank fails; then every rank is gone. The exit code: rank 0's, or
        the failed rank's."""
        alive = {p.sentinel: p for p in self.procs}
        code = 0
        while alive:
            for sentinel in multiprocessing.connection.wait(list(alive)):
                p = alive.pop(sentinel)
                p.join()
                if p.exitcode != 0 and not code:
                    code = p.exitcode if p.exitcode > 0 else 128 - p.exitcode
                    log.error("tensor-parallel %s exited with %s; stopping the other ranks", p.name, p.exitcode)
                    self._kill(alive.values())
                elif p is self.procs[0]:
                    self._stop_followers(alive.values())
        return code

    def _stop_followers(self, procs) -> None:
        for p in list(procs):
            p.join(STOP_GRACE_SECONDS)
        self._kill(p for p in procs if p.is_alive())

    @staticmethod
    def _kill(procs) -> None:
        for p in list(procs):
            p.kill()


def run_engine_ranks(tp: TensorParallel, device: str, engine_config, leader: Callable, *args) -> int:
    """Every rank builds its shard of the engine; rank 0 runs `leader(engine, *args)`, the others follow it."""
    import dataclasses

    from phasesplit.engine.engine import LLMEngine
    engine = LLMEngine(dataclasses.replace(engine_config, device=device), tp)
    if not tp.is_leader:
        engine.follow()
        return 0
    try:
        return leader(engine, *args)
    finally:
        engine.close()
