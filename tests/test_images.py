"""`trainer.callbacks.images`: ImageGridCallback, read back as the images TensorBoard shows."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from tests.helpers import fit_segmentation_visuals, read_logged, seg_data
from trainer.callbacks import ImageGridCallback
from trainer.callbacks.images import BORDER
from trainer.callbacks.tensorboard import stretch_contrast


def logged(run_dir, tag: str, index: int = -1) -> torch.Tensor:
    """The `index`-th image logged under `tag`, as TensorBoard shows it: uint8 (C, H, W)."""
    event = read_logged(run_dir).Images(tag)[index]
    with Image.open(io.BytesIO(event.encoded_image_string)) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def as_shown(image: torch.Tensor) -> torch.Tensor:
    """A float image in [0, 1] on the 0-255 scale of a logged image."""
    return image * 255


def fit_grid(callback):
    """One epoch of a small segmentation net with `callback`."""
    fit_segmentation_visuals([callback], epochs=1)


def test_image_grid_size_denormalised_and_masks(tmp_path):
    data = seg_data()
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    normalised = TensorDataset((data.tensors[0] - 0.5) / 0.25, data.tensors[1])
    callback = ImageGridCallback(tmp_path, num_images=4, mean=mean, std=std, nrow=2, every_n_epochs=1, min_side=None)
    fit_segmentation_visuals([callback], data=normalised)
    acc = read_logged(tmp_path)
    images, masks = acc.Images("images"), acc.Images("masks")
    assert [e.step for e in images] == [0, 2, 4]
    padding = 3
    assert (images[0].width, images[0].height) == (2 * 16 + 3 * padding, 2 * 16 + 3 * padding)
    assert len(masks) == 3
    grid = logged(tmp_path, "images")
    # shown as the user sees it (TensorBoard truncates to 8 bits)
    assert (grid[:, 3:19, 3:19] - as_shown(data.tensors[0][0])).abs().max() <= 1


def test_grid_tiles_are_framed_in_grey_so_masks_never_merge(tmp_path):
    masks = torch.ones(4, 1, 8, 8)  # all foreground: with black padding, the tiles would be one white block
    fit_grid(ImageGridCallback(tmp_path, batch=(torch.rand(4, 3, 8, 8), masks), nrow=2, min_side=None))
    grid = logged(tmp_path, "masks")
    assert grid.shape == (3, 2 * 8 + 3 * 3, 2 * 8 + 3 * 3)
    between = grid[:, :, 11:14].float()  # the column between the two tiles of a row
    assert (between == between[0, 0, 0]).all() and (between - as_shown(BORDER)).abs().max() <= 1
    assert 0.2 < BORDER < 0.8
    assert torch.all(grid[:, 3:11, 3:11] == 255)


def test_tiny_images_are_enlarged_to_a_legible_grid_unless_told_not_to(tmp_path):
    """8x8 images (scikit-learn's digits) become 64x64 tiles, each pixel an 8x8 block."""
    g = torch.Generator().manual_seed(0)
    images, masks = torch.rand(4, 3, 8, 8, generator=g), (torch.rand(4, 1, 8, 8, generator=g) > 0.5).float()
    fit_grid(ImageGridCallback(tmp_path / "enlarged", batch=(images, masks), nrow=2))
    fit_grid(ImageGridCallback(tmp_path / "native", batch=(images, masks), nrow=2, min_side=None))
    fit_grid(ImageGridCallback(tmp_path / "wide", batch=(torch.rand(2, 3, 20, 50, generator=g), None), min_side=64))
    enlarged = logged(tmp_path / "enlarged", "images")
    assert enlarged.shape[-2:] == logged(tmp_path / "enlarged", "masks").shape[-2:] == (2 * 64 + 3 * 3, 2 * 64 + 3 * 3)
    nearest = images[0].repeat_interleave(8, 1).repeat_interleave(8, 2)  # each pixel an 8x8 block
    assert (enlarged[:, 3:67, 3:67] - as_shown(nearest)).abs().max() <= 1
    assert logged(tmp_path / "native", "images").shape[-2:] == (2 * 8 + 3 * 3, 2 * 8 + 3 * 3)
    assert logged(tmp_path / "wide", "images").shape[-2:] == (80 + 2 * 3, 2 * 200 + 3 * 3)  # shorter side 20 -> 80
    with pytest.raises(ValueError, match="min_side must be a positive integer or None"):
        ImageGridCallback(tmp_path, min_side=0)


def test_contrast_stretch_brightens_dim_images_one_by_one(tmp_path):
    g = torch.Generator().manual_seed(0)
    dim = 0.05 + 0.1 * torch.rand(2, 3, 16, 16, generator=g)  # a dim image: values 0.05-0.15
    dim[1] = 0.5 + 0.4 * dim[1]  # a brighter, low-contrast one
    flat = torch.full((1, 3, 16, 16), 0.3)
    stretched = stretch_contrast(torch.cat([dim, flat]))
    for image in stretched[:2]:
        low, high = torch.quantile(image.flatten(), torch.tensor([0.01, 0.99]))
        assert low == pytest.approx(0.0, abs=1e-3) and high == pytest.approx(1.0, abs=1e-3)
    assert torch.equal(stretched[2], flat[0])  # nothing to stretch
    fit_grid(ImageGridCallback(tmp_path / "stretched", batch=(dim, (dim > 0.1).float()), stretch=True, min_side=None))
    fit_grid(ImageGridCallback(tmp_path / "plain", batch=(dim, (dim > 0.1).float()), min_side=None))
    stretched, plain = logged(tmp_path / "stretched", "images"), logged(tmp_path / "plain", "images")
    first_tile = (slice(None), slice(3, 19), slice(3, 19))  # the dim image
    assert stretched[first_tile].float().mean() > 3 * plain[first_tile].float().mean()
    masks = logged(tmp_path / "stretched", "masks"), logged(tmp_path / "plain", "masks")
    assert torch.equal(*masks)  # masks are never stretched
