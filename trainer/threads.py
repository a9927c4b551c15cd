"""How many CPU threads a process may use: its CPU affinity, its container's CPU quota, and the
other training processes on the same machine.

torch starts one thread per CPU in the process's affinity mask. It does not read a container's
CPU quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``): ``docker run --cpus 1`` on a 32-core
host gets 32 threads that the quota throttles, many times slower than one. Under torchrun every
local process starts as many threads as there are CPUs, so N processes oversubscribe N-fold.
`choose_threads` sizes the count to what the process may really use; `use_threads` applies it.

The count never depends on how busy the machine is at the moment: a different count changes how
reductions are split across threads, hence the last bits of the weights, and the same command with
the same seed must give the same weights on the same machine.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.options import positive_int

#: Where cgroup file systems are mounted.
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count a process trains with (`threads`) and why: in full (`reason`) and in a few
    words for the line printed at the start of a run (`summary`; empty: `reason`)."""

    threads: int
    reason: str
    summary: str = ""

    def __str__(self) -> str:
        """The count and why in a few words: ``2 threads (CPU affinity)``."""
        return f"{self.threads} thread{'s' if self.threads != 1 else ''} ({self.summary or self.reason})"


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


def local_processes() -> int:
    """Training processes sharing this machine: torchrun's ``LOCAL_WORLD_SIZE`` (1 outside it)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def choose_threads(requested: int | None = None) -> ThreadChoice:
    """The intra-op thread count for this process: `requested` when given, else the user's
    ``OMP_NUM_THREADS`` (outside torchrun, which sets it to 1 for each of several local processes
    unless it was set), else the CPUs it may use (affinity, capped by the cgroup CPU quota rounded
    up) shared evenly among the local training processes, at least one."""
    if requested is not None:
        positive_int("threads", requested)
        return ThreadChoice(requested, "as asked")
    asked = omp_num_threads()
    if asked is not None and local_processes() == 1:
        return ThreadChoice(asked, f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}", "OMP_NUM_THREADS")
    cpus, reasons, why = affinity_cpus(), [], "CPU affinity"  # why: what limits the count, in a word or two
    reasons.append(f"{cpus} CPU{'s' if cpus != 1 else ''} in this process's affinity")
    quota = cpu_quota()
    if quota is not None and math.ceil(quota) < cpus:
        cpus = math.ceil(quota)
        reasons.append(f"cgroup CPU quota {quota:g}")
        why = "CPU quota"
    processes = local_processes()
    if processes > 1:
        reasons.append(f"shared by {processes} local processes")
        why = f"{processes} processes"
    return ThreadChoice(max(1, cpus // processes), ", ".join(reasons), why)


def omp_num_threads() -> int | None:
    """The thread count ``OMP_NUM_THREADS`` asks for (its first level), or None when it is not set
    or not a positive integer (OpenMP ignores such a value too)."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def use_threads(requested: int | None = None) -> ThreadChoice:
    """Set torch's intra-op thread count to `choose_threads` (`requested`) and return the choice."""
    choice = choose_threads(requested)
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    return choice
