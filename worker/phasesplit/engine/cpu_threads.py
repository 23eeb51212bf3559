"""torch's CPU threads sized to the CPUs this process may use. torch starts one thread per core it sees,
and a container sees every core of its node: a worker limited to 4 CPUs on a 64-core node would run 64
threads that its CPU quota throttles in turn. The CPUs it may use are its affinity, capped by its
cgroup's quota (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us` over `cpu.cfs_period_us`)."""

from __future__ import annotations

import math
import os
import pathlib

CGROUP_ROOT = pathlib.Path("/sys/fs/cgroup")


def cpu_quota(root: pathlib.Path = CGROUP_ROOT) -> float | None:
    """The CPUs the cgroup's quota allows per period; None when it sets none (or none is readable)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for v1 in (root / "cpu", root / "cpu,cpuacct"):
        try:
            quota = int((v1 / "cpu.cfs_quota_us").read_text())
            period = int((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota <= 0 else quota / period
    return None


def usable_cpus(root: pathlib.Path = CGROUP_ROOT) -> int:
    """Whole CPUs this process may keep busy: at least 1."""
    cpus = len(os.sched_getaffinity(0))
    quota = cpu_quota(root)
    if quota is not None:
        cpus = min(cpus, math.floor(quota))
    return max(cpus, 1)


def share(usable: int, default: int, processes: int) -> int:
    """One process's torch threads: its share of the usable CPUs, never more than torch's own default
    (the machine's physical cores: hyperthreads slow its kernels down), at least 1."""
    return max(min(usable, default) // processes, 1)


def size_torch_threads(processes: int = 1) -> int:
    """Sets torch's intra-op threads to this process's `share` (`processes` share the CPUs: the
    tensor-parallel ranks of one pod) and returns it; OMP_NUM_THREADS, when set, is left to decide."""
    import torch
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = share(usable_cpus(), torch.get_num_threads(), processes)
    torch.set_num_threads(threads)
    return threads
