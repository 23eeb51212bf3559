"""torch's CPU threads follow the container's CPU quota (cgroup v2 or v1), not the node's core count."""

import os

import pytest

from phasesplit.engine import cpu_threads


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("files, quota", [
    ({"cpu.max": "400000 100000\n"}, 4.0),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
    ({"cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 0.5),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_the_quota_is_read_from_cgroup_v2_or_v1(tmp_path, files, quota):
    for name, text in files.items():
        write(tmp_path / name, text)
    assert cpu_threads.cpu_quota(tmp_path) == quota


def test_a_quota_below_the_visible_cores_caps_the_cpus_and_never_below_one(tmp_path):
    visible = len(os.sched_getaffinity(0))
    assert cpu_threads.usable_cpus(tmp_path) == visible
    write(tmp_path / "cpu.max", "50000 100000\n")
    assert cpu_threads.usable_cpus(tmp_path) == 1
    write(tmp_path / "cpu.max", f"{(visible + 8) * 100000} 100000\n")
    assert cpu_threads.usable_cpus(tmp_path) == visible


@pytest.mark.parametrize("usable, default, processes, threads", [
    (4, 32, 1, 4),     # a container limited to 4 CPUs on a 32-core node
    (8, 32, 2, 4),     # two tensor-parallel ranks share them
    (3, 32, 2, 1),
    (1, 32, 4, 1),     # never none
    (16, 8, 1, 8),     # 16 hyperthreads of 8 cores: torch's default, the cores, stays
])
def test_a_process_gets_its_share_of_the_usable_cpus_up_to_torchs_default(usable, default, processes, threads):
    assert cpu_threads.share(usable, default, processes) == threads


def test_torch_threads_are_set_unless_omp_num_threads_says(monkeypatch):
    import torch
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(cpu_threads, "usable_cpus", lambda: 1)
        assert cpu_threads.size_torch_threads() == 1 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        assert cpu_threads.size_torch_threads() == 3
    finally:
        torch.set_num_threads(before)
