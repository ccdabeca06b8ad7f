"""CPU thread count: the cgroup quota and affinity bound torch's threads; a user's OMP_NUM_THREADS wins."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from peftlab import cpu


def _cgroup(tmp_path: Path, v2: str | None = None, v1: tuple[str, str] | None = None) -> Path:
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2)
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(v1[0])
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(v1[1])
    return tmp_path


@pytest.mark.parametrize(("v2", "v1", "expected"), [
    ("max 100000\n", None, None),
    ("150000 100000\n", None, 1.5),
    (None, ("-1", "100000"), None),
    (None, ("200000", "100000"), 2.0),
    (None, None, None),
    ("garbage", None, None),
])
def test_cgroup_cpu_limit(tmp_path: Path, v2: str | None, v1: tuple[str, str] | None, expected: float | None) -> None:
    assert cpu.cgroup_cpu_limit(_cgroup(tmp_path, v2, v1)) == expected


def test_usable_cpus_rounds_a_fractional_quota_up_and_never_exceeds_affinity(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert cpu.usable_cpus(_cgroup(tmp_path, "50000 100000")) == 1
    assert cpu.usable_cpus(Path("/nonexistent")) == affinity
    (tmp_path / "cpu.max").write_text("6400000 100000")  # 64 CPUs of quota: affinity is the bound
    assert cpu.usable_cpus(tmp_path) == affinity


def test_configure_threads_caps_torch_at_usable_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(cpu, "usable_cpus", lambda root=None: 1)
        torch.set_num_threads(4)  # as torch would on a 4-core host seen through a 1-CPU quota
        assert cpu.configure_threads() == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_configure_threads_keeps_a_users_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        monkeypatch.setattr(cpu, "usable_cpus", lambda root=None: 1)
        torch.set_num_threads(3)
        assert cpu.configure_threads() == 3
    finally:
        torch.set_num_threads(before)
