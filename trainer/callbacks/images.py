"""`ImageGridCallback`: a grid of input images (and masks) in TensorBoard."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeGuard

import torch
from torchvision.utils import make_grid

from trainer.batch import split_batch
from trainer.callbacks.figures import image_with_legend
from trainer.callbacks.palette import class_names, colour_masks, is_label_batch, label_masks
from trainer.callbacks.tensorboard import TensorBoardWriterCallback, denormalize, stretch_contrast, take_batch
from trainer.every import Every
from trainer.options import positive_int

#: The grey of the lines between tiles: neither the black background nor a white mask.
BORDER = 0.5


def is_mask_batch(targets: Any, images: torch.Tensor) -> TypeGuard[torch.Tensor]:
    """Whether `targets` are per-pixel masks of `images` (segmentation) rather than labels."""
    return isinstance(targets, torch.Tensor) and targets.dim() == 4 and targets.shape[-2:] == images.shape[-2:]


class ImageGridCallback(TensorBoardWriterCallback):
    """Log a grid (`torchvision.utils.make_grid`) of the first `num_images` of a fixed batch.

    Images are shown as the user sees them: the normalisation given by `mean`/`std` is undone
    (and, with `stretch`, each image's contrast is stretched so that dim images show). Tiles are
    separated by `padding` pixels of grey, so that neighbouring masks never merge. For
    segmentation batches (targets are masks of the images' size) a grid of the masks is logged
    too, under `mask_tag`: white on black for one class; for K >= 2 classes each class in its
    fixed colour (`palette.class_colours`) with a legend of the class names under the grid.
    Label maps (integer (N, H, W) targets of class indices) are shown the same way, one colour
    per class, with their `ignore_index` pixels black. Logged at fit start, and every
    `every_n_epochs` epochs if set. Tiny images (e.g. 8x8 digits) are enlarged by a whole factor,
    nearest neighbour, until their shorter side is at least
    `min_side` pixels, so that the grid is legible at TensorBoard's card size.

    Args:
        log_dir: the run directory (shared with the run's other TensorBoard callbacks).
        batch: ``(images, targets)`` or an images tensor; default: the first validation batch
            (or training batch when there is no validation data).
        num_images: how many of the batch's images are shown.
        mean, std: the normalisation of the images (per channel or scalars), undone for display.
        every_n_epochs: also log the grid again every N epochs (default: at fit start only).
        tag: the tag of the image grid.
        mask_tag: the tag of the mask grid (segmentation batches).
        nrow: tiles per row.
        classes: names of the mask classes, for the legend (default: ``class 0``, ...).
        padding: width in pixels of the grey lines between and around tiles.
        stretch: stretch each image's contrast (its 1st and 99th percentiles to black and
            white); masks are never stretched.
        min_side: enlarge images whose shorter side is below this many pixels (nearest
            neighbour, by a whole factor); None shows them at their own size.
        ignore_index: label maps: the value of pixels of no class.
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
        classes: Sequence[str] | None = None,
        padding: int = 3,
        stretch: bool = False,
        min_side: int | None = 64,
        ignore_index: int = 255,
    ) -> None:
        super().__init__(log_dir)
        self.ignore_index = ignore_index
        self.padding, self.stretch = padding, stretch
        self.min_side = positive_int("min_side", min_side, optional=True)
        self._again = Every(every_n_epochs, "every_n_epochs")
        self.batch, self.num_images, self.mean, self.std = batch, num_images, mean, std
        self.every_n_epochs, self.tag, self.mask_tag, self.nrow = every_n_epochs, tag, mask_tag, nrow
        self.classes = list(classes) if classes is not None else None
        self._grids: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer) -> None:
        batch = take_batch(trainer, self.batch, self.num_images)
        images, targets = (batch, None) if isinstance(batch, torch.Tensor) else split_batch(batch)
        shown = denormalize(images, self.mean, self.std)
        if self.stretch:
            shown = stretch_contrast(shown)
        self._grids = {self.tag: self._grid(shown)}
        if is_label_batch(targets, images) or is_mask_batch(targets, images):
            if is_label_batch(targets, images):
                masks = label_masks(targets, len(self.classes) if self.classes else None, self.ignore_index).float()
            else:
                masks = targets.float().clamp(0, 1)
            if masks.shape[1] == 1:
                self._grids[self.mask_tag] = self._grid(masks)
            else:
                grid = self._grid(colour_masks(masks))
                self._grids[self.mask_tag] = image_with_legend(grid, class_names(self.classes, masks.shape[1]))
        if not self.resumed:
            self._write(trainer)

    def _grid(self, images: torch.Tensor) -> torch.Tensor:
        factor = -(-self.min_side // min(images.shape[-2:])) if self.min_side is not None else 1
        if factor > 1:  # nearest neighbour by a whole factor: every pixel becomes a factor x factor block
            images = images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
        return make_grid(images, nrow=self.nrow, padding=self.padding, pad_value=BORDER)

    def on_epoch_end(self, trainer, logs) -> None:
        if self._again(trainer.epoch + 1):
            self._write(trainer)

    def _write(self, trainer) -> None:
        for tag, grid in self._grids.items():
            self._rank_zero_writer().add_image(tag, grid, trainer.global_step)
