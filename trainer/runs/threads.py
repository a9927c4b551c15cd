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

import os
from dataclasses import dataclass

import torch

from trainer.openmp import local_processes, omp_num_threads, usable_cpus
from trainer.options import positive_int

__all__ = ["ThreadChoice", "choose_threads", "use_threads"]


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


def choose_threads(requested: int | None = None) -> ThreadChoice:
    """The intra-op thread count for this process: `requested` when given, else the user's
    ``OMP_NUM_THREADS`` (outside torchrun, which sets it to 1 for each of several local processes
    unless it was set), else `trainer.openmp.usable_cpus`: the CPUs it may use (affinity, capped by
    the cgroup CPU quota rounded up) shared evenly among the local training processes, at least one."""
    if requested is not None:
        positive_int("threads", requested)
        return ThreadChoice(requested, "as asked")
    asked = omp_num_threads()
    if asked is not None and local_processes() == 1:
        return ThreadChoice(asked, f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}", "OMP_NUM_THREADS")
    count = usable_cpus()
    return ThreadChoice(count.cpus, count.reason, count.summary)


def use_threads(requested: int | None = None) -> ThreadChoice:
    """Set torch's intra-op thread count to `choose_threads` (`requested`) and return the choice."""
    choice = choose_threads(requested)
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    return choice
