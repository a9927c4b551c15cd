"""torch's OpenMP threads on this machine: the CPUs a training process may use, and how the threads
wait between parallel regions, decided when `trainer` is first imported, before it loads torch.

The CPUs (`usable_cpus`): the process's affinity mask, capped by its container's CPU quota (cgroup v2
``cpu.max``, v1 ``cpu.cfs_quota_us``), shared among torchrun's local processes. One count, read
before torch loads (for the wait policy) and after (the thread count, `trainer.runs.threads`), so
the two never disagree.

How the threads wait (`WAIT_POLICY`): by default an OpenMP thread that finishes its share keeps the
CPU spinning for a while, waiting for the next region. On an idle machine that is the fastest.
Beside another busy process it is the slowest by far: a spinning thread uses up its fair share of
the CPU it shares with that process, so the scheduler runs the other process first whenever work
arrives, and every parallel region waits for it (measured on 2 cores beside one CPU-bound process: a
NestedUNet step about 3x its idle time, against 1.9x for threads that sleep). Threads that sleep at
once (``OMP_WAIT_POLICY=PASSIVE``) are woken at once instead, but cost up to 2x on an idle machine
for small networks, whose parallel regions are short (``python -m bench.wait_policy`` measures each
setting; no single one is close to the default when idle and to the fair share when busy).

The policy is read once, when the OpenMP runtime loads with torch, so `choose_wait_policy`
decides it at the first ``import trainer`` (which ``import recipes`` and every recipe command
do first), whatever the user's file imports next: passive when other processes keep the CPUs
busy, else the default. Where torch was imported before `trainer`, it is too late: a fit on the
CPU of a busy machine then says so in one line with the fix (`late_import_warning`). The policy
changes timing only, never results: the thread count (see `trainer.runs.threads`) is what decides
how work is split. This module uses the standard library only, so that it can run before torch
is imported.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

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


#: Environment variables with which a user chooses the policy; when one is set it is kept.
USER_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
#: Other processes must keep at least this many more CPUs busy than this process's threads leave
#: free for threads to wait passively.
BUSY_MARGIN = 0.5


@dataclass(frozen=True)
class WaitPolicy:
    """How OpenMP threads wait, as `choose_wait_policy` decided it: in a few words for the line
    printed at the start of a run (`summary`, also ``str()``: ``"OpenMP sleeps (busy)"``) and in
    full, with the load measured (`reason`). `too_late` is True when torch was loaded before the
    decision, with whatever policy its environment held."""

    summary: str
    reason: str
    too_late: bool = False

    def __str__(self) -> str:
        return self.summary


def busy_cpus(seconds: float = 0.1, stat: str = "/proc/stat") -> float | None:
    """CPUs kept busy by other processes over `seconds` (all the machine's work, less this
    process's own), or None where the kernel does not say (no ``/proc/stat``)."""
    first, own = _cpu_ticks(stat), _own_ticks()
    if first is None:
        return None
    time.sleep(seconds)
    second, own_after = _cpu_ticks(stat), _own_ticks()
    if second is None:
        return None
    hertz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy_ticks = (second[0] - first[0]) - (own_after - own) * hertz
    wall_ticks = max(1e-9, (second[1] - first[1]) / max(1, os.cpu_count() or 1))
    return max(0.0, busy_ticks / wall_ticks)


def _cpu_ticks(stat: str) -> tuple[int, int] | None:
    """(busy, total) ticks of all CPUs since boot."""
    try:
        with open(stat, encoding="ascii") as file:
            fields = file.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user time
    return total - idle, total


def _own_ticks() -> float:
    times = os.times()
    return times.user + times.system


def choose_wait_policy(
    threads: int | None = None,
    environ: MutableMapping[str, str] | None = None,
    measure: Callable[[], float | None] = busy_cpus,
) -> WaitPolicy:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in `environ` (default: this process's environment) when
    other processes keep more CPUs busy than `threads` threads leave free, and return what was
    chosen and why (`WaitPolicy`). A policy the user set is kept; after torch is loaded it is too
    late and nothing is changed.

    Args:
        threads: the threads this process will run (default: `usable_cpus`, the
            count the run's threads get: affinity, container CPU quota, torchrun's local processes).
        environ: where to set the policy.
        measure: returns the CPUs busy with other work (see `busy_cpus`).
    """
    environ = os.environ if environ is None else environ
    if threads is None:
        threads = usable_cpus(environ).cpus
    given = [name for name in USER_SETTINGS if environ.get(name)]
    if given:
        return WaitPolicy("OpenMP as set", f"OpenMP waiting as set by {given[0]}={environ[given[0]]}")
    if "torch" in sys.modules:
        return WaitPolicy(
            "OpenMP as loaded", "OpenMP waiting left as loaded: torch was imported before trainer", too_late=True
        )
    busy = measure()
    if busy is None:
        return WaitPolicy("OpenMP spins", "OpenMP threads spin while waiting (load unknown)")
    free = (os.cpu_count() or 1) - busy
    if free < threads - BUSY_MARGIN:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return WaitPolicy(
            "OpenMP sleeps (busy)", f"OpenMP threads sleep while waiting: other work keeps {busy:.1f} CPUs busy"
        )
    return WaitPolicy("OpenMP spins (idle)", f"OpenMP threads spin while waiting: {busy:.1f} CPUs busy with other work")


def late_import_warning(
    policy: WaitPolicy, threads: int, measure: Callable[[], float | None] = busy_cpus
) -> str | None:
    """The line a fit on the CPU prints when torch was imported before `trainer` (`policy` is
    `WaitPolicy.too_late`) with OpenMP's spinning default and other processes keep the CPUs busy
    now: why it is slow and how to fix it. None otherwise (also when the load cannot be read).

    Args:
        policy: what `choose_wait_policy` decided at the first ``import trainer``.
        threads: the threads this process runs.
        measure: returns the CPUs busy with other work (see `busy_cpus`).
    """
    if not policy.too_late:
        return None
    busy = measure()
    if busy is None or (os.cpu_count() or 1) - busy >= threads - BUSY_MARGIN:
        return None
    return (
        f"torch was imported before trainer, so its OpenMP threads spin while they wait, and other work keeps "
        f"{busy:.1f} CPUs busy: training runs up to 3x slower than with sleeping threads; import trainer (or "
        "recipes) before torch, or set OMP_WAIT_POLICY=PASSIVE in the environment"
    )


#: How torch's OpenMP threads wait, decided when this module is first imported: by the first
#: ``import trainer``, before the package loads torch.
WAIT_POLICY: WaitPolicy = choose_wait_policy()


@functools.cache
def warn_late_import(threads: int) -> None:
    """Warn (`RuntimeWarning`) with `late_import_warning`'s line, where there is one; once per
    process and thread count, since it samples the machine's load for 0.1 s. A fit on the CPU calls it.

    Args:
        threads: the threads this process runs.
    """
    line = late_import_warning(WAIT_POLICY, threads)
    if line is not None:
        warnings.warn(line, RuntimeWarning, stacklevel=3)
