"""torch's OpenMP threads on this machine: the CPUs a training process may use, where the threads
run and how they wait between parallel regions, decided when `trainer` is first imported, before
it loads torch.

The CPUs (`usable_cpus`): the process's affinity mask, capped by its container's CPU quota (cgroup v2
``cpu.max``, v1 ``cpu.cfs_quota_us``), shared among torchrun's local processes. One count, read
before torch loads (for the wait policy) and after (the thread count, `trainer.runs.threads`), so
the two never disagree.

Where the threads run and how they wait (`WAIT_POLICY`): by default an OpenMP thread that
finishes its share keeps its CPU spinning for a while, waiting for the next parallel region, and
the scheduler moves threads between CPUs freely. On an idle machine that is the fastest. Beside
another busy process it is the slowest by far: whenever the scheduler puts that process on a CPU
one of the threads was using, every parallel region waits for that thread to run again (measured
on 2 cores beside one CPU-bound process: a NestedUNet step in bf16 about 3.2x its idle time,
where the fair share is 2x). Threads that sleep while waiting (``OMP_WAIT_POLICY=PASSIVE``) help
little there and cost up to 2x on an idle machine for small networks. Threads bound to one CPU
each (`choose_placement`, and `trainer.pinning` during a fit) do not: the other process settles
on one CPU and shares it with one thread, and the step takes about 2.1x (``python -m
bench.wait_policy``), while idle they run as fast as unbound ones. So where each thread can have
a CPU of its own, threads are bound and keep the spinning default beside busy processes, now or
later, unless every CPU is busy at the start (another training run, say: then they sleep while
they wait too); elsewhere (a container's CPU quota, torchrun's processes, fewer threads than
CPUs), threads sleep while waiting when the machine is busy at the start. ``python -m
bench.wait_policy`` measures every setting.

Both are read once, when the OpenMP runtime loads with torch, so `choose_wait_policy` decides
them at the first ``import trainer`` (which ``import recipes`` and every recipe command do
first), whatever the user's file imports next. Where torch was imported before `trainer`, it is
too late: a fit on the CPU of a busy machine then says so in one line with the fix
(`late_import_warning`). Neither changes results: the thread count (see `trainer.runs.threads`)
is what decides how work is split. This module uses the standard library only, so that it can
run before torch is imported.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, MutableMapping, Sequence
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


def usable_cpus(environ: Mapping[str, str] | None = None, affinity: int | None = None) -> CPUCount:
    """The CPUs this process may use: its affinity mask (`affinity` CPUs; default: this process's
    mask), capped by the cgroup CPU quota rounded up, shared evenly among the local training
    processes (`local_processes` of `environ`)."""
    cpus, summary = affinity_cpus() if affinity is None else affinity, "CPU affinity"
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
    return len(_affinity()) or os.cpu_count() or 1


def _affinity() -> set[int]:
    """The CPUs of this process's affinity mask; empty where the OS has no masks."""
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return set()


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
#: Environment variables with which a user places OpenMP threads on CPUs; when one is set it is kept.
USER_PLACEMENT = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")
#: Holds the ``OMP_PLACES`` this package set, so that a child process that inherits the
#: environment and imports `trainer` tells it from a user's and decides for its own CPUs.
PLACEMENT_MARK = "TRAINER_OPENMP_PLACES"
#: Other processes must keep at least this many more CPUs busy than this process's threads leave
#: free for threads to wait passively.
BUSY_MARGIN = 0.5


@dataclass(frozen=True)
class WaitPolicy:
    """How OpenMP threads wait and where they run, as `choose_wait_policy` decided it: in a few
    words for the line printed at the start of a run (`summary`, also ``str()``: ``"OpenMP
    pinned"``) and in full, with the load measured (`reason`). `too_late` is True when torch was
    loaded before the decision, with whatever policy its environment held. `placed` holds the
    CPUs when each thread beyond the first was bound to one of them (the first, which runs the
    user's code and starts child processes, keeps every CPU but during a fit, see
    `trainer.pinning.threads_at_work`); empty when threads are not bound."""

    summary: str
    reason: str
    too_late: bool = False
    placed: tuple[int, ...] = ()

    def __str__(self) -> str:
        return self.summary


def one_cpu_each(cpus: Sequence[int]) -> str:
    """``OMP_PLACES`` for one OpenMP thread per CPU of `cpus`: the first place holds them all
    (OpenMP binds the initial thread to it: the main thread, and the processes it starts,
    keep every CPU), each next place one CPU, from the second on (``{0,1,2},{1},{2}``)."""
    ordered = sorted(cpus)
    return ",".join(["{" + ",".join(map(str, ordered)) + "}", *("{" + str(cpu) + "}" for cpu in ordered[1:])])


def choose_placement(environ: MutableMapping[str, str], cpus: Sequence[int] | None = None) -> tuple[int, ...]:
    """Bind torch's OpenMP threads to one CPU each (``OMP_PROC_BIND=true`` and `one_cpu_each` as
    ``OMP_PLACES`` in `environ`) when they will use every CPU of the process alone, and return
    those CPUs; else leave `environ` as it is and return ``()``.

    Bound threads keep their parallel regions in step beside other busy processes: an unbound
    thread that the scheduler moves onto a CPU another process holds stalls every region until
    it runs again (measured on 2 cores beside one CPU-bound process: a NestedUNet step about
    2.1x its idle time bound, 3.2x unbound, and the same on an idle machine). Threads are not
    bound where that could put two processes' threads on one CPU while others idle: a
    container's CPU quota below the CPUs it sees, torchrun's local processes,
    ``OMP_NUM_THREADS`` below the CPUs, a single CPU, or placement the user chose
    (`USER_PLACEMENT`); a placement inherited from a parent process (`PLACEMENT_MARK`) is
    decided again for this one.

    Args:
        environ: the environment torch will read when it loads.
        cpus: the process's CPUs (default: its affinity mask).
    """
    inherited = environ.get(PLACEMENT_MARK)
    if inherited is not None:
        if environ.get("OMP_PLACES") == inherited:
            environ.pop("OMP_PLACES", None)
            environ.pop("OMP_PROC_BIND", None)
        environ.pop(PLACEMENT_MARK)
    if any(environ.get(name) for name in USER_PLACEMENT) or "torch" in sys.modules:
        return ()
    mask = sorted(_affinity() if cpus is None else cpus)
    count = usable_cpus(environ, len(mask)).cpus
    if len(mask) < 2 or count != len(mask) or omp_num_threads(environ) not in (None, count):
        return ()
    places = one_cpu_each(mask)
    environ.update({"OMP_PROC_BIND": "true", "OMP_PLACES": places, PLACEMENT_MARK: places})
    return tuple(mask)


def omp_num_threads(environ: Mapping[str, str] | None = None) -> int | None:
    """The thread count ``OMP_NUM_THREADS`` asks for (its first level) in `environ` (default: this
    process's environment), or None when it is not set or not a positive integer (OpenMP ignores
    such a value too)."""
    environ = os.environ if environ is None else environ
    value = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


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
    cpus: Sequence[int] | None = None,
) -> WaitPolicy:
    """Decide, in `environ` (default: this process's environment) before torch loads, where
    torch's OpenMP threads run and how they wait, and return what was chosen and why.

    Where each thread can have a CPU of its own (`choose_placement`), threads are bound to
    them and wait as OpenMP does by default (spinning a while): the fastest when idle and,
    bound, near the fair share beside busy processes, whenever their load starts; only when other
    work keeps every CPU busy at the start (another training run, say: two pinned runs that both
    spin take twice as long each as when the second sleeps), they sleep while waiting
    (``OMP_WAIT_POLICY=PASSIVE``). Threads that are not bound sleep while waiting when other
    processes keep more CPUs busy than `threads` threads leave free at the start. Variables the
    user set are kept; after torch is loaded it is too late and nothing is changed.

    Args:
        threads: the threads this process will run (default: `usable_cpus`, the
            count the run's threads get: affinity, container CPU quota, torchrun's local processes).
        environ: where to set the policy.
        measure: returns the CPUs busy with other work (see `busy_cpus`).
        cpus: the process's CPUs (default: its affinity mask).
    """
    environ = os.environ if environ is None else environ
    placed = choose_placement(environ, cpus)
    bound = f", one pinned to each of {_cpu_list(placed)} (the main thread to the first during a fit)" if placed else ""
    given = [name for name in USER_SETTINGS if environ.get(name)]
    if given:
        return WaitPolicy(
            "OpenMP as set" + (", pinned" if placed else ""),
            f"OpenMP waiting as set by {given[0]}={environ[given[0]]}{bound}",
            placed=placed,
        )
    if "torch" in sys.modules:
        return WaitPolicy(
            "OpenMP as loaded", "OpenMP waiting left as loaded: torch was imported before trainer", too_late=True
        )
    busy = measure()
    if busy is None:
        return WaitPolicy(
            "OpenMP pinned" if placed else "OpenMP spins",
            f"OpenMP threads spin while waiting (load unknown){bound}",
            placed=placed,
        )
    free = (os.cpu_count() or 1) - busy
    # Pinned threads spin while a CPU is left free of other work: a busy process then shares one
    # thread's CPU. When none is (another training run, say), they sleep, so that both runs go on.
    threads = threads or (0 if placed else usable_cpus(environ).cpus)  # counted only for threads not pinned
    if free < (BUSY_MARGIN if placed else threads - BUSY_MARGIN):
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return WaitPolicy(
            "OpenMP pinned, sleeps" if placed else "OpenMP sleeps (busy)",
            f"OpenMP threads sleep while waiting: other work keeps {busy:.1f} CPUs busy{bound}",
            placed=placed,
        )
    return WaitPolicy(
        "OpenMP pinned" if placed else "OpenMP spins (idle)",
        f"OpenMP threads spin while waiting: {busy:.1f} CPUs busy with other work{bound}",
        placed=placed,
    )


def _cpu_list(cpus: Sequence[int]) -> str:
    """``CPUs 0-3`` for a run of CPUs, else ``CPUs 0,2,5``."""
    ordered = sorted(cpus)
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"CPUs {ordered[0]}-{ordered[-1]}"
    return "CPUs " + ",".join(map(str, ordered))


def late_import_warning(
    policy: WaitPolicy, threads: int, measure: Callable[[], float | None] = busy_cpus
) -> str | None:
    """The line a fit on the CPU prints when torch was imported before `trainer` (`policy` is
    `WaitPolicy.too_late`) with OpenMP's defaults (threads free to move, spinning while they
    wait) and other processes keep the CPUs busy now: why it is slow and how to fix it. None
    otherwise (also when the load cannot be read).

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
        f"torch was imported before trainer, so its OpenMP threads are not pinned to CPUs, and other work keeps "
        f"{busy:.1f} CPUs busy: training may run up to 3x slower; import trainer (or recipes) before torch, or "
        "set OMP_WAIT_POLICY=PASSIVE in the environment"
    )


#: How torch's OpenMP threads wait, decided when this module is first imported: by the first
#: ``import trainer``, before the package loads torch.
WAIT_POLICY: WaitPolicy = choose_wait_policy()


@functools.cache
def warn_late_import(threads: int, stacklevel: int = 3) -> None:
    """Warn (`RuntimeWarning`) with `late_import_warning`'s line, where there is one; once per
    process and thread count, since it samples the machine's load for 0.1 s. A fit on the CPU
    calls it (through `trainer.pinning.threads_at_work`).

    Args:
        threads: the threads this process runs.
        stacklevel: the frame the warning names, as `warnings.warn` counts (3: the caller's caller).
    """
    line = late_import_warning(WAIT_POLICY, threads)
    if line is not None:
        warnings.warn(line, RuntimeWarning, stacklevel=stacklevel)
