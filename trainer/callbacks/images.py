"""`ImageGridCallback`: a grid of input images (and masks) in TensorBoard."""

from __future__ import annotations

import os
from typing import Any

import torch
from torchvision.utils import make_grid

from trainer.batch import split_batch
from trainer.callbacks.tensorboard import TensorBoardWriterCallback, denormalize, take_batch


def is_mask_batch(targets: Any, images: torch.Tensor) -> bool:
    """Whether `targets` are per-pixel masks of `images` (segmentation) rather than labels."""
    return isinstance(targets, torch.Tensor) and targets.dim() == 4 and targets.shape[-2:] == images.shape[-2:]


class ImageGridCallback(TensorBoardWriterCallback):
    """Log a grid (`torchvision.utils.make_grid`) of the first `num_images` of a fixed batch.

    Images are shown as the user sees them: the normalisation given by `mean`/`std` is undone.
    For segmentation batches (targets are masks of the images' size) a grid of the masks is
    logged too, under `mask_tag`. Logged at fit start, and every `every_n_epochs` epochs if set.

    Args:
        log_dir: the run directory (shared with the run's other TensorBoard callbacks).
        batch: ``(images, targets)`` or an images tensor; default: the first validation batch
            (or training batch when there is no validation data).
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        batch: Any = None,
        num_images: int = 16,
        mean: Any = None,
        std: Any = None,
        every_n_epochs: int | None = None,
        tag: str = "images",
        mask_tag: str = "masks",
        nrow: int = 8,
    ) -> None:
        super().__init__(log_dir)
        if every_n_epochs is not None and (not isinstance(every_n_epochs, int) or every_n_epochs < 1):
            raise ValueError(f"every_n_epochs must be a positive integer or None, got {every_n_epochs!r}")
        self.batch, self.num_images, self.mean, self.std = batch, num_images, mean, std
        self.every_n_epochs, self.tag, self.mask_tag, self.nrow = every_n_epochs, tag, mask_tag, nrow
        self._grids: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer) -> None:
        super().on_fit_start(trainer)
        batch = take_batch(trainer, self.batch, self.num_images)
        images, targets = (batch, None) if isinstance(batch, torch.Tensor) else split_batch(batch)
        self._grids = {self.tag: make_grid(denormalize(images, self.mean, self.std), nrow=self.nrow)}
        if is_mask_batch(targets, images):
            self._grids[self.mask_tag] = make_grid(targets.float().clamp(0, 1), nrow=self.nrow)
        if not self.resumed:
            self._write(trainer)

    def on_epoch_end(self, trainer, logs) -> None:
        if self.every_n_epochs and (trainer.epoch + 1) % self.every_n_epochs == 0:
            self._write(trainer)
        super().on_epoch_end(trainer, logs)

    def _write(self, trainer) -> None:
        for tag, grid in self._grids.items():
            self.writer.add_image(tag, grid, trainer.global_step)
