"""trainer.openmp's CPU count and trainer.runs.threads: thread counts from the affinity mask, the container's CPU
quota (cgroup v1 and v2 files written by the test) and torchrun's local processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import trainer.openmp as openmp_module
from trainer.openmp import choose_wait_policy, cpu_quota
from trainer.runs.threads import choose_threads, use_threads


@pytest.fixture(autouse=True)
def no_omp_num_threads(monkeypatch):
    """The thread counts below as on a machine where the user did not set OMP_NUM_THREADS."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def cgroup_v2(tmp_path: Path, cpu_max: str, nested: str | None = None) -> tuple[Path, Path]:
    """A cgroup v2 tree with `cpu_max` in the process's own group (or in its parent when `nested`
    names a child group without a quota of its own)."""
    root = tmp_path / "cgroup"
    group = root / "docker" / "abc"
    group.mkdir(parents=True)
    (group / "cpu.max").write_text(cpu_max + "\n")
    proc = tmp_path / "proc-cgroup"
    if nested:
        (group / nested).mkdir()
        (group / nested / "cpu.max").write_text("max 100000\n")
        proc.write_text(f"0::/docker/abc/{nested}\n")
    else:
        proc.write_text("0::/docker/abc\n")
    return root, proc


@pytest.mark.parametrize("cpu_max, expected", [("150000 100000", 1.5), ("max 100000", None), ("50000 100000", 0.5)])
def test_cgroup_v2_quota(tmp_path, cpu_max, expected):
    root, proc = cgroup_v2(tmp_path, cpu_max)
    assert cpu_quota(root, proc) == expected


def test_cgroup_v2_quota_of_a_parent_group_applies(tmp_path):
    root, proc = cgroup_v2(tmp_path, "200000 100000", nested="worker")
    assert cpu_quota(root, proc) == 2.0


def test_cgroup_v1_quota(tmp_path):
    root = tmp_path / "cgroup"
    group = root / "cpu,cpuacct" / "docker" / "abc"
    group.mkdir(parents=True)
    (group / "cpu.cfs_quota_us").write_text("100000\n")
    (group / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cpu_quota(root, proc) == 1.0
    (group / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "no quota"
    assert cpu_quota(root, proc) is None


def test_no_cgroup_files_means_no_quota(tmp_path):
    assert cpu_quota(tmp_path / "none", tmp_path / "missing") is None


def test_a_quota_caps_the_threads_and_says_so(mocker):
    mocker.patch.object(openmp_module, "affinity_cpus", return_value=32)
    mocker.patch.object(openmp_module, "cpu_quota", return_value=1.5)
    choice = choose_threads()
    assert choice.threads == 2 and "cgroup CPU quota 1.5" in choice.reason and "32 CPUs" in choice.reason
    assert str(choice) == "2 threads (CPU quota)"  # the start line's words; the numbers are in the reason


def test_local_torchrun_processes_share_the_cpus(mocker, monkeypatch):
    mocker.patch.object(openmp_module, "affinity_cpus", return_value=8)
    mocker.patch.object(openmp_module, "cpu_quota", return_value=None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    choice = choose_threads()
    assert choice.threads == 2 and "shared by 4 local processes" in choice.reason
    assert str(choice) == "2 threads (4 processes)"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert choose_threads().threads == 1  # never fewer than one


@pytest.mark.parametrize("value, expected", [("3", 3), ("1", 1), ("4,2", 4), ("0", None), ("many", None), ("", None)])
def test_omp_num_threads_of_the_user_is_followed_outside_torchrun(mocker, monkeypatch, value, expected):
    """A user's OMP_NUM_THREADS=1 is not overridden; a value OpenMP would ignore is ignored. Under
    torchrun, which sets it to 1 for each of its processes, the share of the CPUs wins."""
    mocker.patch.object(openmp_module, "affinity_cpus", return_value=8)
    mocker.patch.object(openmp_module, "cpu_quota", return_value=None)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    choice = choose_threads()
    assert choice.threads == (expected or 8)
    assert (f"OMP_NUM_THREADS={value}" in choice.reason) == (expected is not None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert choose_threads().threads == 2


def test_use_threads_sets_torch_and_a_request_wins():
    before = torch.get_num_threads()
    try:
        choice = use_threads(1)
        assert choice.threads == 1 and torch.get_num_threads() == 1 and str(choice) == "1 thread (as asked)"
        with pytest.raises(ValueError, match="threads must be a positive integer, got 0"):
            use_threads(0)
    finally:
        torch.set_num_threads(before)


def test_the_openmp_decision_before_torch_and_the_thread_count_after_read_one_cpu_count(mocker, monkeypatch):
    """Under a quota of 1.5 CPUs on 32 in the affinity mask, both count 2 threads: with 2 CPUs free
    of other work, 2 threads leave none waiting, so OpenMP keeps spinning (a count of 32, which
    ignored the quota, would have chosen sleeping threads)."""
    mocker.patch.object(openmp_module, "affinity_cpus", return_value=32)
    mocker.patch.object(openmp_module, "cpu_quota", return_value=1.5)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    mocker.patch.dict("sys.modules")
    del sys.modules["torch"]  # as before torch loads
    policy = choose_wait_policy(environ={}, measure=lambda: (os.cpu_count() or 1) - 2.0, cpus=range(32))
    assert choose_threads().threads == 2 and policy.summary == "OpenMP spins (idle)"
    # 2 local processes share the 2 threads: one each, and one CPU free of other work is enough
    assert choose_wait_policy(
        environ={"LOCAL_WORLD_SIZE": "2"}, measure=lambda: (os.cpu_count() or 1) - 1.0, cpus=range(32)
    ).summary == ("OpenMP spins (idle)")
