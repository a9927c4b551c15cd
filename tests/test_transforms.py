"""`trainer_datasets.transforms`: the joint augmentation of image and mask, seeded per item."""

from __future__ import annotations

import torch

from tests.helpers import write_png, write_sample
from trainer_datasets import SegmentationFolder

# Augmentation


def test_augmentation_keeps_image_and_mask_aligned(tmp_path):
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(1, 16, 16, generator=g) > 0.7).to(torch.uint8)
    mask[0, :3, :5] = 1  # asymmetric, so every flip and rotation changes it
    image = torch.cat([mask * 255, torch.full((2, 16, 16), 128, dtype=torch.uint8)])
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    write_png(image, str(tmp_path / "images" / "a.png"))
    write_png(mask * 255, str(tmp_path / "masks" / "a.png"))
    data = SegmentationFolder(tmp_path, augment=True)
    seen = set()
    for epoch in range(24):
        data.set_epoch(epoch)
        image_out, mask_out = data[0]
        assert set(mask_out.unique().tolist()) <= {0.0, 1.0}
        # colour jitter changes values but not which pixels are bright: channel 0 marks the mask
        assert torch.equal(image_out[0] > image_out[0].mean(), mask_out[0] > 0.5)
        seen.add(mask_out.numpy().tobytes())
    assert len(seen) >= 4  # flips and rotations were applied, a new draw each epoch


def test_an_items_augmentation_depends_on_seed_epoch_and_index_alone(tmp_path):
    """Whatever the global generator holds and whatever was loaded before, item i of epoch e
    is the same; loading it leaves the global generator where it was."""
    for i in range(3):
        write_sample(tmp_path, f"s{i}", seed=i)
    data = SegmentationFolder(tmp_path, augment=True, seed=4)
    data.set_epoch(2)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = [data[i] for i in range(3)]
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(1)
    again = SegmentationFolder(tmp_path, augment=True, seed=4)
    again.set_epoch(2)
    for i in (2, 0, 1, 0):
        assert all(torch.equal(a, b) for a, b in zip(again[i], first[i]))
    for other_seed, other_epoch in ((5, 2), (4, 3)):
        other = SegmentationFolder(tmp_path, augment=True, seed=other_seed)
        other.set_epoch(other_epoch)
        assert any(not torch.equal(other[i][0], first[i][0]) for i in range(3))
