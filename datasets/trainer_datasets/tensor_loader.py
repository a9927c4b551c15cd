"""`TensorBatchLoader`: fast batches from an in-memory uint8 image tensor, normalised per batch."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import torch

from trainer.options import positive_int
from trainer_datasets._seeding import generator
from trainer_datasets.errors import DatasetError

_CHUNK_SAMPLES = 2048  # samples normalised together (6 MB of float32 for 28x28 images)


class TensorBatchLoader:
    """Iterate ``(inputs, labels)`` batches over uint8 images held in one tensor.

    A drop-in for a `DataLoader` over small image sets (Fashion-MNIST): no per-sample Python
    work, no worker processes. Only the batch is converted: ``inputs`` are float32
    ``(B, C, H, W)`` equal to ``(x / 255 - mean) / std``.

    With ``shuffle=True`` each pass draws a permutation from a generator seeded with
    ``(seed, epoch)``. The epoch advances by one after every complete pass, or is set with
    `set_epoch`; a pass abandoned early (e.g. taking one batch for a visual) does not advance
    it, so peeking at the loader does not change the training order. `skip_batches` starts the
    next pass late, without touching the batches before: a run resumed inside an epoch continues
    at its next batch.

    Args:
        images: uint8 ``(N, H, W)`` or ``(N, C, H, W)``.
        labels: ``(N,)`` tensor (any dtype; returned as given).
        batch_size: samples per batch.
        shuffle: a new order each epoch, from `seed` and the epoch; False keeps the order.
        seed: seeds the shuffled orders.
        mean, std: the normalisation of the inputs (after scaling to [0, 1]).
        drop_last: leave out a last batch smaller than `batch_size`.
        pin_memory: pin batches in page-locked memory (ignored when CUDA is not available).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        mean: float = 0.5,
        std: float = 0.5,
        drop_last: bool = False,
        pin_memory: bool = False,
    ) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() not in (3, 4):
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise DatasetError(f"images must be a uint8 tensor of shape (N, H, W) or (N, C, H, W), got {got}")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or len(labels) != len(images):
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise DatasetError(f"labels must be a 1-D tensor with one label per image ({len(images)}), got {shape}")
        positive_int("batch_size", batch_size)
        if not std > 0:
            raise DatasetError(f"std must be positive, got {std!r}")
        self.images = images if images.dim() == 4 else images.unsqueeze(1)
        self.labels = labels
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.mean, self.std = float(mean), float(std)
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.num_samples = len(images)
        self.epoch = 0
        self._skip = 0  # batches the next pass leaves out
        self._total = len(images)  # samples before sharding
        self._shard: tuple[int, int, bool] | None = None  # (rank, world_size, equal_sizes)

    def shard(self, rank: int, world_size: int, train: bool) -> TensorBatchLoader:
        """This process's part of the data when `world_size` processes train together.

        Every rank draws the same permutation per epoch and keeps every `world_size`-th sample
        from `rank`. For training (`train`) the parts are cut to equal size so every rank takes
        the same number of steps; for evaluation each sample is seen exactly once.
        """
        part = copy.copy(self)
        part._shard = (rank, world_size, train)
        total = self._total
        part.num_samples = total // world_size if train else len(range(rank, total, world_size))
        return part

    def set_epoch(self, epoch: int) -> None:
        """Use the order of `epoch` for the next pass (as `DistributedSampler.set_epoch`)."""
        self.epoch = int(epoch)

    def skip_batches(self, num_batches: int) -> None:
        """Start the next pass at batch `num_batches` of its epoch's order (once)."""
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 0:
            raise DatasetError(f"num_batches must be an int >= 0, got {num_batches!r}")
        self._skip = num_batches

    def __len__(self) -> int:
        """Number of batches per pass."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, skip, self._skip = self.epoch, self._skip, 0
        total = self._total
        order = torch.randperm(total, generator=generator(self.seed, epoch)) if self.shuffle else None
        if self._shard is not None:
            rank, world_size, _ = self._shard
            order = (order if order is not None else torch.arange(total))[rank::world_size][: self.num_samples]
        scale, shift = 1.0 / (255.0 * self.std), self.mean / self.std
        end = min(len(self) * self.batch_size, self.num_samples)
        # Whole chunks are gathered and normalised at once; batches are views into them, so the
        # per-batch cost is a slice, not four small tensor operations.
        chunk = self.batch_size * max(1, _CHUNK_SAMPLES // self.batch_size)
        for first in range(min(skip * self.batch_size, end), end, chunk):
            last = min(first + chunk, end)
            index = order[first:last] if order is not None else slice(first, last)
            inputs = self.images[index].to(torch.float32).mul_(scale).sub_(shift)
            labels = self.labels[index]
            if self.pin_memory:
                inputs, labels = inputs.pin_memory(), labels.pin_memory()
            for start in range(0, last - first, self.batch_size):
                yield inputs[start : start + self.batch_size], labels[start : start + self.batch_size]
        self.epoch = epoch + 1
