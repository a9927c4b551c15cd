"""`trainer_datasets.synthetic`: SyntheticNuclei."""

from __future__ import annotations

import pytest
import torch

from trainer_datasets import (
    DatasetError,
    SegmentationFolder,
    SyntheticNuclei,
)


@pytest.fixture(scope="module")
def nuclei():
    return SyntheticNuclei(12, image_size=48, seed=3)


# SyntheticNuclei


def test_synthetic_shapes_ranges_and_binary_masks(nuclei):
    assert len(nuclei) == 12
    for i in range(len(nuclei)):
        image, mask = nuclei[i]
        assert image.dtype == mask.dtype == torch.float32
        assert image.shape == (3, 48, 48) and mask.shape == (1, 48, 48)
        assert 0 <= image.min() and image.max() <= 1
        assert set(mask.unique().tolist()) == {0.0, 1.0}
        assert 0.02 < mask.mean() < 0.5
        # nuclei are brighter than the background, but not trivially separable
        inside, outside = image[:, mask[0] > 0].mean(), image[:, mask[0] == 0].mean()
        assert inside > outside + 0.05


def test_synthetic_is_deterministic_and_independent_of_length(nuclei):
    again = SyntheticNuclei(5, image_size=48, seed=3)
    for i in range(5):
        assert torch.equal(again[i][0], nuclei[i][0]) and torch.equal(again[i][1], nuclei[i][1])
    assert not torch.equal(nuclei[0][0], nuclei[1][0])
    assert not torch.equal(SyntheticNuclei(1, image_size=48, seed=4)[0][0], nuclei[0][0])
    shifted = SyntheticNuclei(2, image_size=48, seed=3, offset=4)
    assert torch.equal(shifted[0][0], nuclei[4][0])
    with pytest.raises(IndexError):
        nuclei[12]


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(DatasetError, match="image_size"):
        SyntheticNuclei(2, image_size=0)
    with pytest.raises(DatasetError, match="num_samples"):
        SyntheticNuclei(-1)


def test_synthetic_save_and_load_back_is_exact(nuclei, tmp_path):
    nuclei.save(tmp_path / "set")
    assert sorted(p.name for p in (tmp_path / "set" / "images").iterdir())[:2] == ["0000.png", "0001.png"]
    assert (tmp_path / "set" / "masks" / "0" / "0000.png").is_file()
    loaded = SegmentationFolder(tmp_path / "set")
    assert len(loaded) == len(nuclei) and loaded.classes == ["0"]
    for i in range(len(nuclei)):
        image, mask = loaded[i]
        assert torch.allclose(image, nuclei[i][0], atol=1 / 255 + 1e-6)
        assert torch.equal(mask, nuclei[i][1])
    with pytest.raises(DatasetError, match="not empty"):
        nuclei.save(tmp_path / "set")
