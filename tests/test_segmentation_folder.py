"""`trainer_datasets.segmentation_folder`, `segmentation_layout` and `segmentation_split`:
SegmentationFolder, scanning a folder, split_segmentation and write_segmentation_folder."""

from __future__ import annotations

import os
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from recipes import nested_unet
from recipes.cli import run_cli
from tests.helpers import write_png, write_sample
from trainer_datasets import (
    DataNotFoundError,
    DatasetError,
    SegmentationFolder,
    SegmentationStream,
    SyntheticNuclei,
    split_segmentation,
    write_label_map,
    write_segmentation_folder,
)
from trainer_datasets.segmentation_layout import read_classes

# SegmentationFolder: layouts


def test_flat_mask_layout_with_jpeg_and_tiff(tmp_path):
    image_a, mask_a = write_sample(tmp_path, "a", value=1)
    write_sample(tmp_path, "b", ext="jpg", seed=1)
    image_c, _ = write_sample(tmp_path, "c", ext="tif", seed=2)
    data = SegmentationFolder(tmp_path)
    assert data.ids == ["a", "b", "c"] and data.classes == ["mask"] and data.num_classes == 1
    image, mask = data[0]
    assert torch.equal(image, image_a.float() / 255) and torch.equal(mask, mask_a.float())
    assert torch.equal(data[2][0], image_c.float() / 255)  # TIFF is lossless
    assert data[1][0].shape == (3, 16, 16)


def test_class_folder_layout_sorted_and_num_classes(tmp_path):
    write_sample(tmp_path, "x", classes=["b_cls", "a_cls"])
    data = SegmentationFolder(tmp_path, num_classes=2)
    assert data.classes == ["a_cls", "b_cls"]
    assert data[0][1].shape == (2, 16, 16)
    with pytest.raises(DatasetError, match="num_classes=3"):
        SegmentationFolder(tmp_path, num_classes=3)


def test_grey_and_rgba_images_become_rgb(tmp_path):
    write_sample(tmp_path, "g")
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(grey, "L").save(tmp_path / "images" / "g.png")
    rgba = np.dstack([np.full((16, 16, 3), 7, np.uint8), np.full((16, 16), 99, np.uint8)])
    write_sample(tmp_path, "r")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "images" / "r.png")
    data = SegmentationFolder(tmp_path)
    g, r = data[0][0], data[1][0]
    assert g.shape == r.shape == (3, 16, 16)
    assert torch.equal(g[0], g[2]) and torch.equal(g[0] * 255, torch.from_numpy(grey).float())
    assert torch.all(r * 255 == 7)


def test_image_size_resizes_images_and_keeps_masks_binary(tmp_path):
    write_sample(tmp_path, "a", size=(20, 30))
    write_sample(tmp_path, "b", size=(16, 16), seed=1)
    data = SegmentationFolder(tmp_path, image_size=12)
    image, mask = data[0]
    assert image.shape == (3, 12, 12) and mask.shape == (1, 12, 12)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


# SegmentationFolder: errors


def test_missing_root_and_folders(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist.*images"):
        SegmentationFolder(tmp_path / "nowhere")
    (tmp_path / "images").mkdir()
    with pytest.raises(DataNotFoundError, match="missing folder .*masks"):
        SegmentationFolder(tmp_path)
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataNotFoundError, match=r"no images in .*images.*expected"):
        SegmentationFolder(tmp_path)


def test_every_unpaired_file_is_listed_in_one_error(tmp_path):
    write_sample(tmp_path, "ok")
    write_sample(tmp_path, "img1")
    write_sample(tmp_path, "img2")
    write_sample(tmp_path, "orphan_mask1")
    write_sample(tmp_path, "orphan_mask2")
    (tmp_path / "masks" / "img1.png").unlink()
    (tmp_path / "masks" / "img2.png").unlink()
    (tmp_path / "images" / "orphan_mask1.png").unlink()
    (tmp_path / "images" / "orphan_mask2.png").unlink()
    with pytest.raises(DatasetError) as info:
        SegmentationFolder(tmp_path)
    message = str(info.value)
    for name in ("images/img1.png", "images/img2.png", "masks/orphan_mask1.png", "masks/orphan_mask2.png"):
        assert name in message
    assert "ok.png" not in message


def test_unpaired_in_one_class_folder(tmp_path):
    write_sample(tmp_path, "a", classes=["0", "1"])
    write_sample(tmp_path, "b", classes=["0", "1"])
    (tmp_path / "masks" / "1" / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"images/b\.png"):
        SegmentationFolder(tmp_path)


def test_corrupt_image_is_named(tmp_path):
    write_sample(tmp_path, "good")
    write_sample(tmp_path, "bad")
    (tmp_path / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(DatasetError, match=r"bad\.png.*corrupt"):
        SegmentationFolder(tmp_path)


def test_colour_coded_mask_is_named(tmp_path):
    write_sample(tmp_path, "a")
    colours = torch.zeros(3, 16, 16, dtype=torch.uint8)
    colours[0, :4], colours[1, 8:] = 255, 255  # red and green regions: classes by colour
    write_png(colours, str(tmp_path / "masks" / "a.png"))
    with pytest.raises(DatasetError, match=r"masks/a\.png is colour-coded"):
        SegmentationFolder(tmp_path)


def test_mask_size_mismatch_names_both_files(tmp_path):
    write_sample(tmp_path, "a")
    write_png(torch.zeros(1, 8, 10, dtype=torch.uint8), str(tmp_path / "masks" / "a.png"))
    with pytest.raises(DatasetError, match=r"masks/a\.png is 10x8 but its image .*images/a\.png is 16x16"):
        SegmentationFolder(tmp_path)


def test_mixed_sizes_need_image_size(tmp_path):
    write_sample(tmp_path, "a", size=(16, 16))
    write_sample(tmp_path, "b", size=(16, 20))
    with pytest.raises(DatasetError, match=r"a\.png is 16x16 but .*b\.png is 20x16.*image_size"):
        SegmentationFolder(tmp_path)


@pytest.mark.parametrize("image_size", [0, -3, 1.5, True, "96"])
@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_bad_image_size_value(tmp_path, image_size, mode):
    """An image size that is not a positive integer is refused by both modes, before any decode."""
    write_sample(tmp_path / "data", "a")
    dataset = SegmentationFolder if mode == "memory" else partial(SegmentationStream, index_dir=tmp_path / "index")
    with pytest.raises(ValueError, match=f"image_size must be a positive integer or None, got {image_size!r}"):
        dataset(tmp_path / "data", image_size=image_size)
    assert not (tmp_path / "index").exists()


# split_segmentation


def test_split_uses_train_and_val_folders(tmp_path):
    for i in range(3):
        write_sample(tmp_path / "train", f"t{i}", seed=i)
    write_sample(tmp_path / "val", "v0")
    train, val = split_segmentation(tmp_path, augment_train=True)
    assert train.ids == ["t0", "t1", "t2"] and val.ids == ["v0"]
    assert train.transform is not None and val.transform is None


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_split_of_train_and_val_folders_with_more_classes_and_other_formats(tmp_path, mode):
    """train/ and val/ of uneven sizes, three class folders and JPEG/TIFF images: the same items
    in memory and streamed, the validation set never augmented."""
    classes = ["cell", "edge", "nucleus"]
    for i, ext in enumerate(["png", "jpg", "tiff", "png", "jpeg"]):
        write_sample(tmp_path / "train", f"t{i}", classes=classes, ext=ext, seed=i)
    write_sample(tmp_path / "val", "v0", classes=classes, ext="tif", seed=9)
    train, val = split_segmentation(tmp_path, seed=4, mode=mode, index_dir=tmp_path / "index", num_classes=3)
    memory = split_segmentation(tmp_path, seed=4, mode="memory")
    assert train.classes == val.classes == classes and len(train) == 5 and len(val) == 1
    assert type(train).__name__ == ("SegmentationFolder" if mode == "memory" else "SegmentationStream")
    assert val.transform is None and train.transform is not None
    for got, want in ((train, memory[0]), (val, memory[1])):
        assert got.ids == want.ids
        assert all(torch.equal(a, b) for i in range(len(got)) for a, b in zip(got[i], want[i]))
        assert got[0][1].shape == (3, 16, 16)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_split_refuses_train_and_val_folders_of_other_classes(tmp_path, mode):
    write_sample(tmp_path / "train", "t0", classes=["a", "b"])
    write_sample(tmp_path / "val", "v0", classes=["a", "c"])
    with pytest.raises(DatasetError, match=r"train/masks has classes \['a', 'b'\] but .*val/masks has \['a', 'c'\]"):
        split_segmentation(tmp_path, mode=mode, index_dir=tmp_path / "index")


def test_split_with_only_val_folder_names_the_missing_train_folder(tmp_path):
    write_sample(tmp_path / "val", "v0")
    with pytest.raises(DataNotFoundError, match=r"found .*val but not .*train; give both"):
        split_segmentation(tmp_path)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_random_split_of_label_maps_gives_both_halves_the_folder_s_classes(tmp_path, mode):
    """Without a classes.txt the classes are 0 up to the largest label found in the whole folder,
    also in a half whose own label maps never reach it."""
    for index in range(6):
        write_sample(tmp_path, f"s{index}", seed=index)
        labels = torch.zeros(16, 16, dtype=torch.long)
        labels[4:8] = 1
        if index == 5:
            labels[10:12] = 3
        write_label_map(labels, tmp_path / "masks" / f"s{index}.png")
    train, val = split_segmentation(
        tmp_path, val_fraction=0.5, seed=1, mode=mode, mask_mode="labels", index_dir=tmp_path / "index"
    )
    assert train.classes == val.classes == ["0", "1", "2", "3"]
    assert train.mask_mode == val.mask_mode == "labels"
    assert sorted(train.ids + val.ids) == [f"s{i}" for i in range(6)] and len(val) == 3


def test_split_with_only_train_folder_is_an_error(tmp_path):
    write_sample(tmp_path / "train", "t0")
    with pytest.raises(DataNotFoundError, match="val"):
        split_segmentation(tmp_path)


def test_seeded_split_is_deterministic_and_disjoint(tmp_path):
    for i in range(10):
        write_sample(tmp_path, f"s{i:02d}", size=(8, 8), seed=i)
    train, val = split_segmentation(tmp_path, val_fraction=0.3, seed=1)
    assert len(val) == 3 and len(train) == 7
    assert not set(train.ids) & set(val.ids) and len(set(train.ids) | set(val.ids)) == 10
    assert val.transform is None
    train2, val2 = split_segmentation(tmp_path, val_fraction=0.3, seed=1)
    assert train2.ids == train.ids and val2.ids == val.ids
    other = [split_segmentation(tmp_path, val_fraction=0.3, seed=s)[1].ids for s in range(2, 6)]
    assert any(ids != val.ids for ids in other)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, "0.2"])
def test_split_rejects_bad_val_fraction(tmp_path, fraction):
    write_sample(tmp_path, "a")
    with pytest.raises(DatasetError, match="val_fraction"):
        split_segmentation(tmp_path, val_fraction=fraction)


def test_write_segmentation_folder_flat(tmp_path):
    data = [(torch.rand(3, 8, 8), (torch.rand(1, 8, 8) > 0.5).float()) for _ in range(3)]
    write_segmentation_folder(data, tmp_path, class_folders=False)
    loaded = SegmentationFolder(tmp_path)
    assert loaded.ids == ["0000", "0001", "0002"]
    assert torch.equal(loaded[2][1], data[2][1])


def test_hidden_and_system_files_are_left_out(tmp_path):
    write_sample(tmp_path, "a", classes=["0"])
    write_sample(tmp_path, "b", classes=["0"])
    for folder in (tmp_path / "images", tmp_path / "masks", tmp_path / "masks" / "0"):
        for name in ("Thumbs.db", "desktop.ini", ".DS_Store", "._a.png"):
            (folder / name).write_bytes(b"written by a file manager")
    dataset = SegmentationFolder(tmp_path)
    assert dataset.ids == ["a", "b"] and dataset.classes == ["0"]
    assert [p.name for p in dataset.layout.files()] == ["a.png", "b.png", "a.png", "b.png"]


def test_entries_that_are_no_regular_files_are_named_and_never_opened(tmp_path):
    write_sample(tmp_path, "a")
    write_sample(tmp_path, "b")
    os.mkfifo(tmp_path / "images" / "fifo.png")  # opening it would block for ever
    (tmp_path / "images" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "masks" / "loop.png").symlink_to(tmp_path / "masks" / "loop.png")
    (tmp_path / "images" / "linked.png").symlink_to(tmp_path / "images" / "a.png")  # a link to a file is fine
    (tmp_path / "masks" / "linked.png").symlink_to(tmp_path / "masks" / "a.png")
    with pytest.raises(DatasetError) as info:
        SegmentationFolder(tmp_path)
    message = str(info.value)
    assert (
        "entries that are not regular files: images/fifo.png (a FIFO), images/gone.png (a dangling symbolic link)"
    ) in message
    assert "masks/loop.png (a symbolic link loop)" in message and "linked" not in message


def test_training_on_a_folder_with_a_fifo_stops_at_once_naming_it(tmp_path, capsys):
    SyntheticNuclei(4, image_size=16, seed=0).save(tmp_path / "data")
    os.mkfifo(tmp_path / "data" / "images" / "x.png")
    argv = ["--data", str(tmp_path / "data"), "--epochs", "1", "--batch-size", "2", "--log-dir", str(tmp_path / "run")]
    assert run_cli(nested_unet.main, argv) == 2  # the folder check never opens the FIFO (that would block)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "images/x.png (a FIFO)" in err
    assert not (tmp_path / "run").exists()


# Class names: they become folder and file names of predict's outputs


def label_map_folder(root, classes_txt: bytes):
    """Two 16x16 images with label maps of classes 0 and 1, and `classes_txt` as classes.txt."""
    for index in range(2):
        write_sample(root, f"s{index}", seed=index)
        labels = torch.zeros(16, 16, dtype=torch.long)
        labels[4:8] = 1
        write_label_map(labels, root / "masks" / f"s{index}.png")
    (root / "classes.txt").write_bytes(classes_txt)
    return root


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize(
    "name",
    ["../x", "/tmp/x", "a/b", "a\\b", ".", "..", "a\x00b", "a\x07b", "a\x0bb"],
    ids=["parent", "absolute", "slash", "backslash", "dot", "dotdot", "nul", "bell", "vertical-tab"],
)
def test_a_classes_txt_name_that_is_no_folder_name_stops_training_in_one_line(tmp_path, capsys, name):
    data = label_map_folder(tmp_path / "data", f"background\n{name}\n".encode())
    before = tree(tmp_path)
    argv = ["--data", str(data), "--arch", "UNet", "--base-filters", "4", "--log-dir", str(tmp_path / "run")]
    assert run_cli(nested_unet.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"error: {data / 'classes.txt'} is not a usable class list (line 2 ({name!r}) " in err
    assert tree(tmp_path) == before  # nothing written: no run folder, the data as it was


def test_a_byte_order_mark_is_not_part_of_the_first_class_name(tmp_path):
    data = label_map_folder(tmp_path, "background\r\nnucleus\r\n".encode("utf-8-sig"))  # as Notepad saves it
    assert SegmentationFolder(data).classes == ["background", "nucleus"]
    assert read_classes(data / "classes.txt") == ["background", "nucleus"]


@pytest.mark.parametrize("name", ["a\\b", "a\x01b", "a\ufeffb"], ids=["backslash", "control", "bom"])
def test_class_folders_whose_names_cannot_name_a_class_are_refused(tmp_path, name):
    write_sample(tmp_path, "x", classes=["cell", name])
    with pytest.raises(DatasetError) as info:
        SegmentationFolder(tmp_path)
    assert str(info.value).count("\n") == 0
    assert f"{tmp_path / 'masks'} holds class folders whose names cannot name a class ({name!r} holds " in str(
        info.value
    )
