"""How many torch threads a process takes on a CPU (common.device.cpu_threads): an explicit count, then
OMP_NUM_THREADS, then the cores it may run on within its cgroup's CPU limit (a container's quota, which the
affinity mask does not show)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common import device


def cgroup_files(tmp_path: Path, v2: str | None = None, v1: tuple[str, str] | None = None
                 ) -> tuple[Path, tuple[Path, Path]]:
    paths = tmp_path / "cpu.max", (tmp_path / "cpu.cfs_quota_us", tmp_path / "cpu.cfs_period_us")
    if v2 is not None:
        paths[0].write_text(v2 + "\n")
    if v1 is not None:
        for path, text in zip(paths[1], v1, strict=True):
            path.write_text(text + "\n")
    return paths


@pytest.mark.parametrize(("v2", "v1", "cores"), [
    ("200000 100000", None, 2),  # cgroup v2: a limit of 2 CPUs
    ("150000 100000", None, 2),  # 1.5 CPUs: the pool gets 2 threads, the quota is shared by them
    ("50000 100000", None, 1),
    ("max 100000", None, None),  # v2 without a limit
    (None, ("400000", "100000"), 4),  # cgroup v1
    (None, ("-1", "100000"), None),  # v1 without a limit
    (None, None, None),  # no cgroup CPU controller visible
    ("garbage", None, None),
])
def test_the_cgroup_cpu_limit_in_whole_cores(tmp_path: Path, v2: str | None, v1: tuple[str, str] | None,
                                             cores: int | None) -> None:
    v2_path, v1_paths = cgroup_files(tmp_path, v2, v1)
    assert device.cgroup_cpu_limit(v2_path, v1_paths) == cores


def test_an_explicit_count_wins_then_omp_num_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert device.cpu_threads(5) == 5
    assert device.cpu_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    monkeypatch.setattr(device, "cgroup_cpu_limit", lambda: None)
    assert device.cpu_threads() == len(device.os.sched_getaffinity(0))


def test_a_cgroup_limit_below_the_affinity_caps_the_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Kubernetes case: every node core in the affinity mask, a CPU limit of one core."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(device, "cgroup_cpu_limit", lambda: 1)
    assert device.cpu_threads() == 1
    monkeypatch.setattr(device, "cgroup_cpu_limit", lambda: 128)  # a limit above the cores changes nothing
    assert device.cpu_threads() == 64


def test_set_cpu_threads_sizes_torch_pool() -> None:
    before = torch.get_num_threads()
    try:
        assert device.set_cpu_threads(1) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
