"""`SyntheticNuclei`: seeded images of nuclei-like blobs with their masks, made in memory."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from trainer_datasets._seeding import generator
from trainer_datasets.errors import DatasetError
from trainer_datasets.segmentation_folder import write_segmentation_folder


class SyntheticNuclei(Dataset):
    """Microscopy-like RGB images of nuclei with binary masks; needs no files.

    Each image has a smooth, tinted, textured background and 4-12 nuclei (some in touching
    pairs): elliptical blobs with irregular outlines, varied size, brightness and colour, a soft
    edge and inner texture, plus pixel noise. The mask is the union of the nuclei. Images are
    learnable (nuclei are brighter than the background) but not trivial (dim nuclei, texture,
    noise, touching pairs).

    Item ``i`` is drawn from a generator seeded with ``(seed, offset + i)``, so it does not depend
    on `num_samples`; use another `seed` (or a disjoint `offset` range) for a validation set.
    All items are generated at construction and kept as uint8, so a PNG round trip is exact.

    Items are ``(image, mask)``: float32 (3, H, W) in [0, 1] and float32 (1, H, W) in {0, 1}.

    Args:
        num_samples: how many images.
        image_size: their side in pixels (H = W).
        seed: with `offset`, what each item is drawn from.
        offset: the index of the first item in the stream of `seed`.
        min_nuclei, max_nuclei: the range of the number of nuclei per image.
        noise: the standard deviation of the pixel noise (in [0, 1] units).
    """

    def __init__(
        self,
        num_samples: int,
        image_size: int = 64,
        seed: int = 0,
        offset: int = 0,
        min_nuclei: int = 4,
        max_nuclei: int = 12,
        noise: float = 0.04,
    ) -> None:
        checks = (("num_samples", num_samples, 0), ("image_size", image_size, 8), ("offset", offset, 0))
        for name, value, low in checks:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise DatasetError(f"{name} must be an int >= {low}, got {value!r}")
        if not 1 <= min_nuclei <= max_nuclei:
            raise DatasetError(f"need 1 <= min_nuclei <= max_nuclei, got {min_nuclei} and {max_nuclei}")
        if not 0 <= noise < 1:
            raise DatasetError(f"noise must be in [0, 1), got {noise!r}")
        self.num_samples, self.image_size, self.seed, self.offset = num_samples, image_size, seed, offset
        self.min_nuclei, self.max_nuclei, self.noise = min_nuclei, max_nuclei, noise
        with _one_thread():
            pairs = [self._render(offset + i) for i in range(num_samples)]
        size = (image_size, image_size)
        self.images = torch.stack([p[0] for p in pairs]) if pairs else torch.empty(0, 3, *size, dtype=torch.uint8)
        self.masks = torch.stack([p[1] for p in pairs]) if pairs else torch.empty(0, 1, *size, dtype=torch.uint8)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return self.images[index].float().div_(255), self.masks[index].float()

    def save(self, root: str | os.PathLike, exist_ok: bool = False) -> Path:
        """Write the set as PNGs: ``<root>/images/<id>.png`` and ``<root>/masks/0/<id>.png``."""
        return write_segmentation_folder(self, root, exist_ok=exist_ok)

    def _render(self, sample: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One (uint8 image (3, S, S), uint8 mask (1, S, S)) from the stream ``(seed, sample)``."""
        g = generator(self.seed, sample)
        size = self.image_size
        nuclei = _draw_nuclei(g, size, self.min_nuclei, self.max_nuclei)
        best, mask, colour = _paint(nuclei, size)
        texture = _smooth_noise(g, size, cells=size // 10 + 2)
        foreground = best * (1 + 0.25 * texture) * colour
        level = float(_uniform(g, 0.05, 0.22))
        background_tint = (1 + _uniform(g, -0.2, 0.2, 3)).view(3, 1, 1)
        background = (level + float(_uniform(g, 0.04, 0.1)) * _smooth_noise(g, size, cells=4)) * background_tint
        image = background + foreground + self.noise * torch.randn(3, size, size, generator=g)
        image = image.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        return image, mask.to(torch.uint8)


class _Nuclei(NamedTuple):
    """The drawn shape, place and look of each nucleus of an image (one value per nucleus)."""

    radius: torch.Tensor
    aspect: torch.Tensor
    angle: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    amplitude: torch.Tensor  # (n, 3): the outline's harmonics
    phase: torch.Tensor  # (n, 3)
    contrast: torch.Tensor
    colours: torch.Tensor  # (n, 3)
    softness: torch.Tensor


def _uniform(g: torch.Generator, low: float, high: float, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=g)


def _draw_nuclei(g: torch.Generator, size: int, min_nuclei: int, max_nuclei: int) -> _Nuclei:
    """The nuclei of one image, drawn from `g`."""
    # Primary nuclei; odd slots are candidate partners placed against the nucleus before them.
    count = int(torch.randint(min_nuclei, max_nuclei + 1, (), generator=g))
    slots = 2 * count
    radius = _uniform(g, 0.045, 0.11, slots) * size
    aspect = _uniform(g, 0.6, 1.0, slots)
    angle = _uniform(g, 0, math.pi, slots)
    cx, cy = _uniform(g, 0.08, 0.92, slots) * size, _uniform(g, 0.08, 0.92, slots) * size
    direction = _uniform(g, 0, 2 * math.pi, slots)
    gap = (radius[0::2] + radius[1::2]) * _uniform(g, 0.8, 0.95, count)
    cx[1::2] = cx[0::2] + gap * torch.cos(direction[1::2])
    cy[1::2] = cy[0::2] + gap * torch.sin(direction[1::2])
    keep = torch.ones(slots, dtype=torch.bool)
    keep[1::2] = torch.rand(count, generator=g) < 0.35
    amplitude = _uniform(g, 0.0, 0.07, slots, 3)
    phase = _uniform(g, 0, 2 * math.pi, slots, 3)
    contrast = _uniform(g, 0.25, 0.6, slots)
    tint = (torch.tensor([0.75, 0.55, 0.95]) + _uniform(g, -0.25, 0.25, 3)).clamp(0.3, 1.0)
    colours = (tint + _uniform(g, -0.12, 0.12, slots, 3)).clamp(0.2, 1.0)
    colours = colours / colours.amax(1, keepdim=True)  # hue varies, brightness is `contrast`
    softness = _uniform(g, 0.35, 0.8, slots)
    drawn = (radius, aspect, angle, cx, cy, amplitude, phase, contrast, colours, softness)
    return _Nuclei(*(t[keep] for t in drawn))


def _paint(nuclei: _Nuclei, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The nuclei's strength (S, S), mask (1, S, S) and colour (3, S, S) on an image of side `size`."""
    radius, aspect, angle, cx, cy, amplitude, phase, contrast, colours, softness = nuclei
    # Each nucleus is evaluated only in a square window around it, wide enough that its soft
    # edge has faded below 1/255 there; windows are then merged into the image by scatter.
    half = math.ceil(1.25 * (float(radius.max()) + 6 * float(softness.max()))) + 1
    offsets = torch.arange(-half, half + 1)
    xs = (cx.round().long().view(-1, 1) + offsets).view(-1, 1, 2 * half + 1)
    ys = (cy.round().long().view(-1, 1) + offsets).view(-1, 2 * half + 1, 1)
    a, b = radius.view(-1, 1, 1), (radius * aspect).view(-1, 1, 1)
    cos, sin = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    dx, dy = xs + 0.5 - cx.view(-1, 1, 1), ys + 0.5 - cy.view(-1, 1, 1)
    u, v = (dx * cos + dy * sin) / a, (dy * cos - dx * sin) / b
    rho, phi = torch.sqrt(u * u + v * v), torch.atan2(v, u)
    harmonics = torch.tensor([2.0, 3.0, 5.0]).view(1, 3, 1, 1)
    waves = torch.cos(harmonics * phi.unsqueeze(1) + phase.view(-1, 3, 1, 1))
    outline = 1 + (amplitude.view(-1, 3, 1, 1) * waves).sum(1)
    d = rho / outline  # < 1 inside the nucleus
    # Soft edge about `softness` pixels wide, centred on the mask boundary d = 1.
    alpha = torch.sigmoid((1 - d) * a / softness.view(-1, 1, 1))
    strength = alpha * (1 - 0.3 * d.clamp(max=1) ** 2) * contrast.view(-1, 1, 1)

    inside = (xs >= 0) & (xs < size) & (ys >= 0) & (ys < size)
    index = torch.where(inside, ys * size + xs, size * size).flatten()  # outside -> a spare slot
    pixels = size * size + 1
    best = torch.zeros(pixels).scatter_reduce_(0, index, strength.flatten(), "amax")[:-1].view(size, size)
    mask = torch.zeros(pixels).scatter_reduce_(0, index, (d < 1).float().flatten(), "amax")[:-1]
    # Colour: the strength-weighted mean of the overlapping nuclei's colours.
    weights = torch.zeros(pixels).index_add_(0, index, strength.flatten())[:-1] + 1e-6
    coloured = (strength.unsqueeze(-1) * colours.view(-1, 1, 1, 3)).view(-1, 3)
    colour = torch.zeros(pixels, 3).index_add_(0, index, coloured)[:-1] / weights.unsqueeze(1)
    return best, mask.view(1, size, size) > 0, colour.t().reshape(3, size, size)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # The per-image tensors are small: splitting each op across threads costs more than it saves,
    # and on a busy machine it made generation ten times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _smooth_noise(g: torch.Generator, size: int, cells: int) -> torch.Tensor:
    """(size, size) smooth noise of about unit amplitude: a coarse random grid, upsampled."""
    coarse = torch.randn(1, 1, cells, cells, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0, 0]
