"""A child process that dies with its parent: the kernel sends it a signal when the parent exits,
however the parent exits. Armed by the child itself after exec, so the parent forks without running
Python in the child (a fork of a threaded process can deadlock there)."""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1
PARENT_PID_ENV = "PHASESPLIT_DIE_WITH_PARENT"


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """`sig` when the process `parent_pid` (this one's parent) exits; at once if it already has."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child that should die with this process (see `arm_from_env`)."""
    return {**(os.environ if env is None else env), PARENT_PID_ENV: str(os.getpid())}


def arm_from_env() -> None:
    """In a child started with `child_env`: die with that parent. The variable is not passed on, so
    what this child starts is tied to it, not to its parent."""
    parent = os.environ.pop(PARENT_PID_ENV, None)
    if parent:
        die_with_parent(int(parent))
