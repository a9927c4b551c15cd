"""Where a fit on the CPU keeps its thread while torch's OpenMP threads are pinned one to a CPU
(`trainer.openmp.choose_placement`): `threads_at_work` around the loop, `every_cpu` where the loop
starts worker processes or threads that should not share the fit's one CPU."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from trainer.openmp import WAIT_POLICY, warn_late_import


@contextlib.contextmanager
def threads_at_work(threads: int) -> Iterator[None]:
    """What a fit on the CPU runs its loop in, given torch's thread count (`threads`).

    Where the threads were bound to one CPU each (`WaitPolicy.placed`) and the process runs one
    thread per CPU, the calling thread (OpenMP's first) is kept on the first CPU until the block
    ends: a thread left free to move lands now and then on the CPU of a bound one, and both run
    at half speed (measured beside one busy process on 2 cores: a NestedUNet step 2.3-2.5x its
    idle time kept, 2.3-4.5x free). Processes forked meanwhile get every CPU back, and the loop
    makes its loaders' iterators (which start their worker processes) and the TensorBoard writer
    (which starts a thread) under `every_cpu`. Where the process runs another number of threads
    (``--threads``, ``torch.set_num_threads``), every thread gets all the CPUs back instead, so
    that two such processes never share a CPU while another idles. Where torch was imported
    before `trainer` on a busy machine, `warn_late_import`.
    """
    global _kept_on  # noqa: PLW0603 - read by the fork handler, which takes no arguments
    placed = WAIT_POLICY.placed
    warn_late_import(threads, stacklevel=5)  # the frame that called fit (through contextlib and fit)
    if not placed:
        yield
        return
    if threads != len(placed):
        _release(threads, placed)
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, placed[:1])
    _kept_on = placed
    try:
        yield
    finally:
        _kept_on = ()
        os.sched_setaffinity(0, before)


#: The CPUs a forked child gets back while `threads_at_work` keeps the calling thread on one.
_kept_on: tuple[int, ...] = ()


@contextlib.contextmanager
def every_cpu() -> Iterator[None]:
    """Give the calling thread every CPU back for the block while `threads_at_work` keeps it on
    one: a DataLoader starts its worker processes when its iterator is made, and sizes its advice
    on their number by the CPUs the thread may use."""
    kept = _kept_on
    if not kept:
        yield
        return
    os.sched_setaffinity(0, kept)
    try:
        yield
    finally:
        os.sched_setaffinity(0, kept[:1])


def _free_forked_child() -> None:
    if _kept_on:
        os.sched_setaffinity(0, _kept_on)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_free_forked_child)


def _release(threads: int, placed: tuple[int, ...]) -> None:
    """Give every thread of the process all of `placed`, those of a team of `threads` included."""
    import torch  # loaded by the caller

    torch.empty(threads * 65536).fill_(0.0)  # a parallel region starts this count's threads, to release them too
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), placed)
        except OSError:  # the thread has ended
            pass
