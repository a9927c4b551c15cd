"""Data orders that are a function of (seed, epoch), so a run can continue inside an epoch.

`ResumableSampler` is PyTorch's `DistributedSampler` (one process or several) whose next pass
can start at a given index: a resumed run skips the batches it trained before its checkpoint
without loading them. `batches_from` starts any loader the trainer knows how to start late;
`start_epoch` tells a loader, its sampler and its dataset which epoch comes next.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler

#: What a loader needs to be to continue at the next batch (for warnings about one that is not).
RESUMABLE_LOADERS = (
    "A list of batches, a DataLoader with sampler=trainer.ResumableSampler(dataset) or a loader "
    "with skip_batches() continues at the next batch"
)


class ResumableSampler(DistributedSampler):
    """Indices of a map-style dataset, in an order that depends only on `seed` and the epoch.

    A `DistributedSampler` (its order: a permutation drawn from ``seed + epoch``, the same on
    every rank; each rank keeps every `num_replicas`-th index, padded to equal length) that also
    works in a single process (``num_replicas=1``, the default), and whose next pass can leave
    out its first indices (`skip`). The trainer calls ``set_epoch`` before every epoch, and on a
    resume inside an epoch ``skip`` with the samples already trained.

    Use it as a `DataLoader`'s ``sampler`` instead of ``shuffle=True``:
    ``DataLoader(dataset, batch_size=32, sampler=ResumableSampler(dataset, seed=0))``.

    Args:
        dataset: the map-style dataset (anything with a length).
        shuffle: a fresh permutation per epoch; False keeps the dataset's order.
        seed: with the epoch, decides the order.
        num_replicas, rank: the processes sharing the data (default: this process alone).
    """

    def __init__(
        self, dataset: Dataset, shuffle: bool = True, seed: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self._skip = 0

    def skip(self, num_samples: int) -> None:
        """Leave out the first `num_samples` indices of the next pass (of this rank's part)."""
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self._skip = num_samples

    def __iter__(self) -> Iterator[int]:
        start, self._skip = self._skip, 0
        indices = super().__iter__()
        return itertools.islice(indices, start, None) if start else indices


def batches_from(loader: Iterable, first: int) -> Iterable | None:
    """`loader`'s next pass, starting at batch `first` without loading the batches before it,
    or None when `loader` cannot start late.

    Loaders that can: a sequence of batches (a list), a loader with ``skip_batches(n)`` (e.g.
    `trainer_datasets.TensorBatchLoader`), and a `DataLoader` with a batch size whose sampler has
    ``skip(num_samples)`` (`ResumableSampler`).
    """
    if first == 0:
        return loader
    how = _late_start(loader)
    if how == "sequence":
        return itertools.islice(loader, first, None)
    if how == "skip_batches":
        loader.skip_batches(first)  # type: ignore[attr-defined]
    elif how == "sampler":
        loader.sampler.skip(first * loader.batch_size)  # type: ignore[attr-defined]
    return loader if how else None


def can_skip_samples(loader: Any) -> bool:
    """Whether `loader` is a `DataLoader` with a batch size whose sampler can `skip`."""
    return (
        isinstance(loader, DataLoader)
        and loader.batch_size is not None
        and callable(getattr(loader.sampler, "skip", None))
    )


def resumable(loader: Iterable) -> bool:
    """Whether the trainer can start `loader` inside an epoch: what `batches_from` accepts."""
    return _late_start(loader) is not None


def _late_start(loader: Iterable) -> str | None:
    """How `loader` starts late: ``"sequence"``, ``"skip_batches"``, ``"sampler"``, or None."""
    if isinstance(loader, Sequence):
        return "sequence"
    if callable(getattr(loader, "skip_batches", None)):
        return "skip_batches"
    if can_skip_samples(loader):
        return "sampler"
    return None


def start_epoch(loader: Iterable, epoch: int) -> None:
    """Tell `loader` that its next pass is `epoch`: ``loader.set_epoch(epoch)``, or its sampler's
    (the order of `ResumableSampler`, `DistributedSampler`), and its dataset's (e.g. the
    augmentations of `trainer_datasets.SegmentationFolder`), where they have one."""
    targets = [
        loader if callable(getattr(loader, "set_epoch", None)) else getattr(loader, "sampler", None),
        getattr(loader, "dataset", None),
    ]
    for target in targets:
        set_epoch = getattr(target, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)


def check_epoch_reaches_workers(loader: Iterable) -> None:
    """Warn when `loader` keeps its worker processes between passes (``persistent_workers``) over
    a dataset with ``set_epoch``: the workers hold the copy of the dataset made at the first pass,
    so they never see a later epoch."""
    dataset = getattr(loader, "dataset", None)
    if (
        isinstance(loader, DataLoader)
        and loader.persistent_workers
        and loader.num_workers > 0
        and callable(getattr(dataset, "set_epoch", None))
    ):
        warnings.warn(
            f"the DataLoader keeps its workers between epochs (persistent_workers=True), so they never see "
            f"{type(dataset).__name__}.set_epoch: every epoch draws what the first drew; pass "
            f"persistent_workers=False",
            RuntimeWarning,
            stacklevel=3,
        )
