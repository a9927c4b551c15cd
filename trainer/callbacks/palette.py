"""One fixed colour per mask class, shared by image grids, prediction figures and the label-map PNGs
that the segmentation recipes' ``predict`` writes (`png_palette`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeGuard

import torch

# Strong, distinguishable colours first (a colour-blind-aware qualitative set), then lighter ones.
_PALETTE = (
    (0.90, 0.10, 0.29),
    (0.24, 0.71, 0.29),
    (0.00, 0.51, 0.78),
    (1.00, 0.88, 0.10),
    (0.96, 0.51, 0.19),
    (0.57, 0.12, 0.71),
    (0.27, 0.94, 0.94),
    (0.94, 0.20, 0.90),
    (0.82, 0.96, 0.24),
    (0.98, 0.75, 0.83),
    (0.00, 0.50, 0.50),
    (0.86, 0.75, 1.00),
    (0.67, 0.43, 0.16),
    (1.00, 0.98, 0.78),
    (0.50, 0.00, 0.00),
    (0.67, 1.00, 0.76),
    (0.50, 0.50, 0.00),
    (1.00, 0.84, 0.71),
    (0.00, 0.00, 0.50),
    (0.50, 0.50, 0.50),
)


def class_colours(count: int) -> torch.Tensor:
    """(count, 3) RGB colours in [0, 1]: class k always gets the same colour (cycling after 20)."""
    return torch.tensor([_PALETTE[k % len(_PALETTE)] for k in range(count)])


def png_palette(count: int = 256, ignore_index: int = 255) -> list[int]:
    """The class colours as a PNG palette: a flat ``[r0, g0, b0, r1, ...]`` list of 0-255 values for
    indices 0 to `count` - 1, index k in class k's colour (`class_colours`), `ignore_index` black
    (as grids show pixels of no class), so that a label map reads in the colours of the grids and
    prediction figures.

    Args:
        count: the number of palette entries; 256 fills a PNG palette.
        ignore_index: the index of pixels of no class.
    """
    values = (class_colours(count) * 255).round().to(torch.uint8)
    if 0 <= ignore_index < count:
        values[ignore_index] = 0
    return values.flatten().tolist()


def colour_masks(masks: torch.Tensor) -> torch.Tensor:
    """(N, K, H, W) masks (bool or in [0, 1]) as (N, 3, H, W) RGB images: each pixel takes the
    colour of its class; where classes overlap, the brightest of their colours per channel."""
    weights = masks.float().clamp(0, 1).unsqueeze(2)  # (N, K, 1, H, W)
    colours = class_colours(masks.shape[1]).view(1, -1, 3, 1, 1)
    return (weights * colours).amax(dim=1)


def class_names(classes: Sequence[str] | None, count: int) -> list[str]:
    """`classes` when it names `count` classes, else ``class 0`` ... ``class count-1``."""
    if classes is not None and len(classes) == count:
        return [str(name) for name in classes]
    return [f"class {k}" for k in range(count)]


def is_label_batch(targets: object, images: torch.Tensor) -> TypeGuard[torch.Tensor]:
    """Whether `targets` are label maps of `images`: integer (N, H, W) class indices of their size."""
    return (
        isinstance(targets, torch.Tensor)
        and targets.dim() == 3
        and not targets.is_floating_point()
        and targets.shape[-2:] == images.shape[-2:]
    )


def label_masks(labels: torch.Tensor, num_classes: int | None = None, ignore_index: int = 255) -> torch.Tensor:
    """(N, H, W) label maps as (N, K, H, W) boolean masks, one per class, for `colour_masks`
    and the segmentation figures; pixels of `ignore_index` (or any value outside the K classes)
    are in no mask, so they show uncoloured.

    Args:
        labels: integer class indices.
        num_classes: K (default: the largest index found, but `ignore_index`, plus one).
        ignore_index: the value of pixels of no class.
    """
    if num_classes is None:
        counted = labels[labels != ignore_index]
        num_classes = int(counted.max()) + 1 if counted.numel() else 1
    classes = torch.arange(num_classes, device=labels.device).view(1, -1, 1, 1)
    return labels.unsqueeze(1) == classes
