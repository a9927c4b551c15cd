"""Several processes under `torchrun`: the process group, sharded loaders and reductions.

A launch is noticed from the variables `torchrun` sets (``WORLD_SIZE`` > 1, ``RANK``,
``LOCAL_RANK``). A single process never touches `torch.distributed`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Sized
from contextvars import ContextVar
from datetime import timedelta
from typing import Any, NoReturn, cast

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, Sampler

from trainer.sampler import ResumableSampler


def launched_world_size() -> int:
    """The number of processes `torchrun` started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


#: Set to ``1`` in a launch of one process (``torchrun --nproc_per_node=1``), the process group
#: starts anyway and the trainer takes every path of several processes through it (collectives,
#: `DistributedDataParallel`, sharded loaders, gathered checkpoints): how one GPU checks NCCL
#: (``python -m bench.gpu_check``).
FORCE_VARIABLE = "TRAINER_DISTRIBUTED"


def _forced() -> bool:
    return os.environ.get(FORCE_VARIABLE) == "1" and "RANK" in os.environ


def _launched() -> bool:
    """Whether torchrun started several processes, or one with `FORCE_VARIABLE` set."""
    return launched_world_size() > 1 or _forced()


_ALONE: ContextVar[bool] = ContextVar("trainer_alone", default=False)


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group (or one alone in
    it, with `FORCE_VARIABLE` set), and not working `alone`."""
    return (
        dist.is_available() and dist.is_initialized() and (dist.get_world_size() > 1 or _forced()) and not _ALONE.get()
    )


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Work on this process alone under torchrun: inside, `is_distributed` is False, so the
    trainer and its callbacks call no collective (a reduction returns this process's value, a
    gather its own), and `get_rank` still says which rank this is. `Trainer.validate` outside a
    fit runs so, which any rank may call without the others."""
    token = _ALONE.set(True)
    try:
        yield
    finally:
        _ALONE.reset(token)


def get_rank() -> int:
    """This process's rank (0 in a single process; from ``RANK`` before the group starts)."""
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    """Number of processes in the group (1 in a single process)."""
    return dist.get_world_size() if is_distributed() else 1


def is_rank_zero() -> bool:
    """Whether this process writes logs and checkpoints."""
    return get_rank() == 0


#: How long a collective waits for the other ranks before the process group gives up: rank 0 alone
#: checks the run folder, measures the precision and builds a streamed folder's index while the
#: others wait in a broadcast, which on a large folder outlasts NCCL's default of 10 minutes.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)


def launched_device(device: torch.device) -> torch.device:
    """This process's device: for CUDA under torchrun, ``cuda:LOCAL_RANK`` where every GPU of the
    machine is visible, or ``cuda:0`` where each process sees one GPU of its own (a cluster that
    sets ``CUDA_VISIBLE_DEVICES`` per process); else `device`. Reads the environment only.

    Raises:
        ValueError: ``LOCAL_RANK`` is beyond the GPUs this process sees, and it sees several.
    """
    if not _launched() or device.type != "cuda":
        return device
    local, visible = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local < visible:
        return torch.device("cuda", local)
    if visible == 1:
        return torch.device("cuda", 0)
    raise ValueError(
        f"LOCAL_RANK={local} but this process sees {visible} GPU(s) (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most {visible} processes per machine, "
        "or give each process one GPU of its own"
    )


def init_distributed(device: torch.device, timeout: timedelta = PROCESS_GROUP_TIMEOUT) -> torch.device:
    """Start the process group once under torchrun and return this process's device.

    gloo on the CPU, NCCL on CUDA with one GPU per process (`launched_device`, also given to NCCL
    as ``device_id``, which binds the group to it). The group is destroyed when the process
    exits. Outside torchrun, returns `device` unchanged. `Trainer.fit` calls it; a recipe calls
    it earlier to share its run directory between the processes.

    Args:
        device: the device asked for (``cuda`` means this process's GPU).
        timeout: how long a collective waits for the other ranks (`PROCESS_GROUP_TIMEOUT`); call
            this before `Trainer.fit` to give another (fit then finds the group started).
    """
    device = launched_device(device)
    if not _launched():
        return device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timeout)
        atexit.register(_destroy)
    return device


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wait_for_all(device: torch.device) -> None:
    """Block until every rank got here (a barrier); a no-op in one process.

    `Trainer.fit` calls it when it ends without an error, so that no rank leaves `fit`, and goes on
    to exit, while another still has a collective in flight: a gloo process that is torn down then
    aborts at exit (``terminate called without an active exception``)."""
    if is_distributed():
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def end_process(code: int) -> NoReturn:
    """End this process with exit status `code`: the exit handlers run and the output is flushed,
    then the process ends without Python's interpreter teardown.

    `recipes.cli.run_cli` ends a process of a torchrun launch this way, and a script of one's own
    that trains under torchrun can end with it too. In the teardown, a thread of gloo that still
    lets go of a finished collective's tensors needs the interpreter, which is shutting down:
    the process aborts (SIGABRT, ``terminate called without an active exception``) after a run
    that saved everything, and torchrun reports it as failed. A busy machine makes it likelier.
    """
    atexit._run_exitfuncs()  # what a normal exit runs before the teardown: this module's _destroy too
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def check_even_batches(num_batches: int | None, device: torch.device) -> None:
    """Under torchrun, a `ValueError` on every rank when the ranks' training loaders yield
    different numbers of batches per epoch (`num_batches`; None for a loader without a length,
    which must yield alike unchecked): DistributedDataParallel all-reduces every step on every
    rank, so a rank that ran out first would leave the others waiting until the group's timeout.
    One reduction, once per fit."""
    if not is_distributed():
        return
    count = -1.0 if num_batches is None else float(num_batches)
    high, negative_low = all_reduce(torch.tensor([count, -count], device=device), "max").tolist()
    if high != -negative_low:
        known = "no length" if num_batches is None else f"{num_batches}"
        raise ValueError(
            f"the ranks' training loaders differ in length (this rank's: {known}; from {-negative_low:.0f} to "
            f"{high:.0f} batches per epoch, -1 for none): under torchrun every rank must take the same number of "
            "steps; use a DataLoader over a map-style dataset (sharded evenly), or shard() a loader to equal parts"
        )


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank (returned unchanged in a single process)."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce `tensor` in place across ranks (``"sum"`` or ``"max"``); a no-op in one process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape and dtype on every rank), in rank order, on every rank;
    ``[tensor]`` in a single process. Every rank must call it."""
    if not is_distributed():
        return [tensor]
    gathered = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(gathered, tensor)
    return gathered


def gather_to_rank_zero(value: Any) -> list[Any] | None:
    """Every rank's `value` (any picklable object, tensors included) as a list on rank 0, in rank
    order, and None on the other ranks; ``[value]`` in a single process. Every rank must call it."""
    if not is_distributed():
        return [value]
    gathered: list[Any] | None = [None] * get_world_size() if is_rank_zero() else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (e.g. batch-norm statistics) so that evaluation on any
    rank uses the model that rank 0 saves."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


class ShardSampler(Sampler[int]):
    """Every `world_size`-th index starting at `rank`, in order, without padding: ranks together
    see each sample exactly once (so reduced sums equal a single process's)."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ShardBatchSampler(Sampler[list[int]]):
    """Every `world_size`-th batch of `batch_sampler` starting at `rank`: the shard of a loader built
    with ``batch_sampler=``. With `even` (training) the batches are first repeated from the start
    up to a multiple of `world_size`, so every rank takes the same number of steps. Every rank must
    draw the same batches from `batch_sampler` (a seeded order); ``set_epoch`` is passed on to it."""

    def __init__(self, batch_sampler: Iterable[list[int]], rank: int, world_size: int, even: bool) -> None:
        self.batch_sampler, self.rank, self.world_size, self.even = batch_sampler, rank, world_size, even

    def __iter__(self) -> Iterator[list[int]]:
        batches = list(self.batch_sampler)
        if self.even and batches and len(batches) % self.world_size:
            batches += batches[: self.world_size - len(batches) % self.world_size]
        return iter(batches[self.rank :: self.world_size])

    def __len__(self) -> int:
        total = len(cast(Sized, self.batch_sampler))
        if self.even:
            return -(-total // self.world_size)
        return len(range(self.rank, total, self.world_size))

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch on to the wrapped batch sampler, where it has ``set_epoch``."""
        set_epoch = getattr(self.batch_sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)


def shard_loader(loader: Iterable, train: bool) -> Iterable:
    """This rank's part of `loader`.

    A `DataLoader` over a map-style dataset is rebuilt with a `ResumableSampler` (a
    `DistributedSampler` that can start a pass late, so a run resumes inside an epoch) for
    training (shuffled when the original was, with the original `ResumableSampler`'s seed, else
    0; reshuffled per epoch by `set_epoch`; every rank gets the same number of batches;
    `drop_last` holds only where the shard has a full batch) or a `ShardSampler` for evaluation
    (each sample once); one built with ``batch_sampler=`` gets a `ShardBatchSampler` of it. The
    rebuilt loader keeps every other setting (workers, collate, pinning, generator,
    multiprocessing context, order). A loader with
    a ``shard(rank, world_size, train)`` method shards itself. Anything else is used whole on
    every rank, with a warning.
    """
    rank, world = get_rank(), get_world_size()
    if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
        workers = loader.num_workers
        return DataLoader(
            loader.dataset,
            **_sharded_batching(loader, train, rank, world),
            num_workers=workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context if workers else None,
            generator=loader.generator,
            persistent_workers=loader.persistent_workers if workers else False,
            prefetch_factor=loader.prefetch_factor if workers else None,
            pin_memory_device=loader.pin_memory_device,
            in_order=loader.in_order,
        )
    shard = getattr(loader, "shard", None)
    if callable(shard):
        return shard(rank, world, train)
    warnings.warn(
        f"{type(loader).__name__} cannot be sharded across {world} processes: every process uses "
        f"all of it; use a DataLoader over a map-style dataset or give the loader a shard() method",
        RuntimeWarning,
        stacklevel=3,
    )
    return loader


def _sharded_batching(loader: DataLoader, train: bool, rank: int, world: int) -> dict[str, Any]:
    """The batching arguments of this rank's shard of `loader` (see `shard_loader`)."""
    if loader.batch_size is None and loader.batch_sampler is not None:  # built with batch_sampler=
        return {"batch_sampler": ShardBatchSampler(loader.batch_sampler, rank, world, even=train)}
    if train:
        original = loader.sampler
        if isinstance(original, ResumableSampler):
            shuffle, seed = original.shuffle, original.seed
        else:
            shuffle, seed = isinstance(original, RandomSampler), 0
        sampler: ResumableSampler | ShardSampler = ResumableSampler(
            loader.dataset, shuffle=shuffle, seed=seed, num_replicas=world, rank=rank
        )
    else:
        sampler = ShardSampler(len(cast(Sized, loader.dataset)), rank, world)  # map-style: it has a length
    # Decided per shard: a shard smaller than one batch keeps its partial batch instead of
    # dropping every sample (DistributedSampler gives every rank the same length).
    drop_last = loader.drop_last and loader.batch_size is not None and len(sampler) >= loader.batch_size
    return {"batch_size": loader.batch_size, "sampler": sampler, "drop_last": drop_last}


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Under torchrun, `model` wrapped in `DistributedDataParallel` (once): wrap it after its
    memory format is settled, since DDP's gradient buckets take the strides it has then. In a
    single process, `model` itself.

    Args:
        model: the network, on `device`.
        device: this process's device (its GPU, with an index, on CUDA).
    """
    if not is_distributed() or isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
