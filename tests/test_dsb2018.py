"""DSB2018 preparation: instance masks merged, resized, written in the segmentation layout."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer_datasets import SegmentationFolder, prepare_dsb2018
from trainer_datasets.dsb2018 import main


def write_raw_sample(src: Path, sample_id: str, image: np.ndarray, boxes: list[tuple[int, int, int, int]]):
    """``<src>/<id>/images/<id>.png`` and one 0/255 mask per (y0, y1, x0, x1) box."""
    (src / sample_id / "images").mkdir(parents=True)
    (src / sample_id / "masks").mkdir()
    Image.fromarray(image).save(src / sample_id / "images" / f"{sample_id}.png")
    height, width = image.shape[:2]
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        mask = np.zeros((height, width), np.uint8)
        mask[y0:y1, x0:x1] = 255
        Image.fromarray(mask).save(src / sample_id / "masks" / f"nucleus{k}.png")


@pytest.fixture
def raw_tree(tmp_path):
    src = tmp_path / "stage1_train"
    grey = np.tile(np.arange(40, dtype=np.uint8) * 6, (32, 1))
    write_raw_sample(src, "grey01", grey, [(2, 10, 2, 10), (20, 30, 25, 38), (8, 12, 8, 16)])
    rgba = np.zeros((48, 48, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 200, 100, 50, 255
    write_raw_sample(src, "rgba02", rgba, [(0, 24, 0, 24), (24, 48, 24, 48)])
    return src


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_prepare_merges_instances_and_resizes(raw_tree, tmp_path):
    dst = tmp_path / "out"
    assert prepare_dsb2018(raw_tree, dst, size=16) == 2
    assert sorted(p.name for p in (dst / "images").iterdir()) == ["grey01.png", "rgba02.png"]
    grey_image, rgba_image = read_png(dst / "images" / "grey01.png"), read_png(dst / "images" / "rgba02.png")
    assert grey_image.shape == rgba_image.shape == (16, 16, 3)
    assert (grey_image[..., 0] == grey_image[..., 2]).all()
    assert (rgba_image == [200, 100, 50]).all()
    grey_mask, rgba_mask = read_png(dst / "masks" / "0" / "grey01.png"), read_png(dst / "masks" / "0" / "rgba02.png")
    assert grey_mask.shape == (16, 16) and set(np.unique(grey_mask)) == {0, 255}
    # two diagonal quadrants, both kept: the masks are merged, not one nucleus per class folder
    assert rgba_mask[:8, :8].all() and rgba_mask[8:, 8:].all() and not rgba_mask[:8, 8:].any()
    assert not (dst / "masks" / "1").exists()
    loaded = SegmentationFolder(dst)
    assert loaded.classes == ["0"] and loaded[0][1].shape == (1, 16, 16)


def test_size_none_keeps_the_original_merged_mask(raw_tree, tmp_path):
    prepare_dsb2018(raw_tree, tmp_path / "full", size=None)
    mask = read_png(tmp_path / "full" / "masks" / "0" / "grey01.png")
    expected = np.zeros((32, 40), np.uint8)
    for y0, y1, x0, x1 in [(2, 10, 2, 10), (20, 30, 25, 38), (8, 12, 8, 16)]:
        expected[y0:y1, x0:x1] = 255
    assert (mask == expected).all()


def test_main_returns_zero(raw_tree, tmp_path, capsys):
    assert main(["--src", str(raw_tree), "--dst", str(tmp_path / "cli"), "--size", "8"]) == 0
    assert "wrote 2 images" in capsys.readouterr().out
    assert read_png(tmp_path / "cli" / "images" / "rgba02.png").shape == (8, 8, 3)


def test_missing_src_exits_2_and_writes_nothing(tmp_path, capsys):
    dst = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(["--src", str(tmp_path / "nowhere"), "--dst", str(dst)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "nowhere" in err and "does not exist" in err
    assert not dst.exists()


def test_sample_without_masks_folder_exits_2_and_writes_nothing(raw_tree, tmp_path, capsys):
    (raw_tree / "nomask03" / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(raw_tree / "nomask03" / "images" / "nomask03.png")
    dst = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(["--src", str(raw_tree), "--dst", str(dst)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nomask03: no masks/ folder" in err
    assert not dst.exists()


@pytest.mark.parametrize("size", ["0", "-4"])
def test_a_size_that_is_not_positive_exits_2_and_writes_nothing(raw_tree, tmp_path, capsys, size):
    dst = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(["--src", str(raw_tree), "--dst", str(dst), "--size", size])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"size must be a positive integer or None, got {size}" in err
    assert not dst.exists()


def test_no_samples_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as info:
        main(["--src", str(tmp_path / "empty"), "--dst", str(tmp_path / "out")])
    assert info.value.code == 2 and "no samples found" in capsys.readouterr().err


def test_bad_mask_late_in_the_tree_writes_nothing(raw_tree, tmp_path):
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(raw_tree / "rgba02" / "masks" / "wrong_size.png")
    with pytest.raises(ValueError, match=r"wrong_size\.png is 5x5 but its image"):
        prepare_dsb2018(raw_tree, tmp_path / "out", size=16)
    assert not (tmp_path / "out").exists()


def test_help_runs_as_a_module(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["dsb2018", "--help"])
    monkeypatch.delitem(sys.modules, "trainer_datasets.dsb2018")  # run afresh, as python -m does
    with pytest.raises(SystemExit) as exit:
        runpy.run_module("trainer_datasets.dsb2018", run_name="__main__")
    out = capsys.readouterr().out
    assert exit.value.code == 0 and "--src" in out and "--size" in out
