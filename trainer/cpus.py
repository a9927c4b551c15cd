"""The CPUs a training process may use: its affinity mask, capped by its container's CPU quota
(cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), shared among torchrun's local processes.

One count, read before torch loads (how OpenMP threads wait, `trainer.openmp`, decided at the first
``import trainer``) and after (the thread count, `trainer.runs.threads`), so the two never disagree.
Standard library only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CPUCount", "affinity_cpus", "cpu_quota", "local_processes", "usable_cpus"]

#: Where cgroup file systems are mounted.
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CPUCount:
    """The CPUs of each training process (`cpus`, at least 1), why in full (`reason`: the CPUs in
    the affinity mask, the quota, the processes sharing them) and in a word or two (`summary`:
    what limits the count)."""

    cpus: int
    reason: str
    summary: str


def usable_cpus(environ: Mapping[str, str] | None = None) -> CPUCount:
    """The CPUs this process may use: its affinity mask, capped by the cgroup CPU quota rounded
    up, shared evenly among the local training processes (`local_processes` of `environ`)."""
    cpus, summary = affinity_cpus(), "CPU affinity"
    reasons = [f"{cpus} CPU{'s' if cpus != 1 else ''} in this process's affinity"]
    quota = cpu_quota()
    if quota is not None and math.ceil(quota) < cpus:
        cpus, summary = math.ceil(quota), "CPU quota"
        reasons.append(f"cgroup CPU quota {quota:g}")
    processes = local_processes(environ)
    if processes > 1:
        reasons.append(f"shared by {processes} local processes")
        summary = f"{processes} processes"
    return CPUCount(max(1, cpus // processes), ", ".join(reasons), summary)


def cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs' worth of time this process's cgroup may use (``docker --cpus 1.5``: 1.5), or None
    without a quota. Reads cgroup v2 ``cpu.max`` and v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``
    of the process's own cgroup and of each parent, and keeps the smallest."""
    quotas = []
    for directory in _cgroup_dirs(root, proc_cgroup):
        v2 = directory / "cpu.max"
        if v2.is_file():
            fields = _read(v2).split()
            quotas.append(_ratio(fields[0], fields[1]) if len(fields) == 2 else None)
            continue
        quota, period = directory / "cpu.cfs_quota_us", directory / "cpu.cfs_period_us"
        if quota.is_file() and period.is_file():
            quotas.append(_ratio(_read(quota), _read(period)))
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """The process's cgroup folders (v2 unified and v1 ``cpu`` controller), each with its parents."""
    dirs: list[Path] = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        names = controllers.split(",")
        if controllers == "":
            base = root
        elif "cpu" in names:
            base = next((root / n for n in (controllers, "cpu,cpuacct", "cpu") if (root / n).is_dir()), root / "cpu")
        else:
            continue
        here = base / path.strip("/")
        while True:
            dirs.append(here)
            if here == base:
                break
            here = here.parent
    if not dirs:
        dirs.append(root)
    return dirs


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max": no quota
        return None
    return q / p if q > 0 and p > 0 else None


def affinity_cpus() -> int:
    """CPUs this process may run on (its affinity mask; all CPUs where the OS has no masks)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def local_processes(environ: Mapping[str, str] | None = None) -> int:
    """Training processes sharing this machine: torchrun's ``LOCAL_WORLD_SIZE`` in `environ`
    (default: this process's environment; 1 outside torchrun)."""
    environ = os.environ if environ is None else environ
    try:
        return max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1
