"""How `--workers 0` counts the cores it may use."""
from __future__ import annotations

import os

from search_service import workers


def test_cgroup_quota_is_read_in_cpus(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")
    assert workers.cgroup_cpus(cpu_max) == 1.5
    cpu_max.write_text("max 100000\n")
    assert workers.cgroup_cpus(cpu_max) is None
    assert workers.cgroup_cpus(tmp_path / "missing") is None
    cpu_max.write_text("garbage\n")
    assert workers.cgroup_cpus(cpu_max) is None


def test_available_cores_is_the_affinity_lowered_to_the_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert workers.available_cores(cpu_max) == affinity
    cpu_max.write_text("50000 100000\n")  # half a CPU still gets one worker
    assert workers.available_cores(cpu_max) == 1
    cpu_max.write_text(f"{(affinity + 5) * 100000} 100000\n")  # a quota above the affinity
    assert workers.available_cores(cpu_max) == affinity


def test_resolve_caps_auto_and_keeps_explicit_counts():
    assert workers.resolve(3) == 3
    assert workers.resolve(20) == 20  # asked for explicitly: not capped
    assert 1 <= workers.resolve(0) <= workers.MAX_AUTO_WORKERS
