"""read_image_rgb, read_mask and write_png_file on real files of every kind the readers accept or refuse.

The files are written here by Pillow, or byte by byte (numpy + zlib) where Pillow cannot write them
(16-bit colour PNG), so the readers are checked against files they did not write themselves.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recipes import nested_unet
from recipes.cli import run_cli
from trainer_datasets import (
    DatasetError,
    SegmentationFolder,
    SyntheticNuclei,
    read_image_rgb,
    read_mask,
    write_png_file,
)


def save(array: np.ndarray, path: Path, mode: str | None = None, **options) -> Path:
    """`array` saved by Pillow (format from the suffix), converted to `mode` first if given."""
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(path, **options)
    return path


def png_bytes(array: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG of `array` ((H, W) or (H, W, C) uint16), built chunk by chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = array.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)  # filter 0 (None) on each row
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


LABELS = np.array([[0, 0, 1, 1], [0, 2, 2, 0], [3, 0, 0, 1000], [0, 0, 0, 0]], np.uint16)  # instance ids
FOREGROUND = (LABELS != 0).astype(np.uint8)


def premultiplied_grey_alpha_tiff(grey: np.ndarray, alpha: np.ndarray, path: Path) -> Path:
    """A grey + associated (premultiplied) alpha TIFF, which Pillow opens as mode La but cannot write."""
    save(np.dstack([grey, alpha]), path)  # written as LA: ExtraSamples = 2 (unassociated alpha)
    data = path.read_bytes()
    entry = struct.pack("<HHIHH", 338, 3, 1, 2, 0)
    assert data.count(entry) == 1
    path.write_bytes(data.replace(entry, struct.pack("<HHIHH", 338, 3, 1, 1, 0)))
    return path


# Images


def test_image_kinds_become_uint8_rgb(tmp_path):
    grey = np.arange(0, 256, 16, dtype=np.uint8).reshape(4, 4)
    rgb = np.stack([grey, 255 - grey, np.full((4, 4), 9, np.uint8)], axis=-1)
    rgba = np.dstack([rgb, np.full((4, 4), 50, np.uint8)])
    cases = {
        "grey.png": (save(grey, tmp_path / "grey.png"), np.stack([grey] * 3)),
        "grey_alpha.png": (save(grey, tmp_path / "grey_alpha.png", "LA"), np.stack([grey] * 3)),
        "rgb.png": (save(rgb, tmp_path / "rgb.png"), rgb.transpose(2, 0, 1)),
        "rgba.png": (save(rgba, tmp_path / "rgba.png"), rgb.transpose(2, 0, 1)),
        "palette.png": (save(rgb, tmp_path / "palette.png", "P"), None),  # colours quantised by Pillow
        "rgb.tif": (save(rgb, tmp_path / "rgb.tif"), rgb.transpose(2, 0, 1)),
        "grey_alpha.tif": (
            premultiplied_grey_alpha_tiff(grey, np.full((4, 4), 255, np.uint8), tmp_path / "grey_alpha.tif"),
            np.stack([grey] * 3),
        ),
        "rgba.tiff": (save(rgba, tmp_path / "rgba.tiff"), rgb.transpose(2, 0, 1)),
        "grey.jpg": (save(grey, tmp_path / "grey.jpg", quality=100), None),  # lossy: shape and type only
    }
    for name, (path, expected) in cases.items():
        image = read_image_rgb(path)
        assert image.dtype == torch.uint8 and image.shape == (3, 4, 4), name
        if expected is not None:
            assert np.array_equal(image.numpy(), expected), name
    assert Image.open(tmp_path / "grey_alpha.tif").mode == "La"
    palette = Image.open(tmp_path / "palette.png").convert("RGB")
    assert np.array_equal(read_image_rgb(tmp_path / "palette.png").numpy(), np.asarray(palette).transpose(2, 0, 1))


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_16_bit_grey_image_is_scaled_over_the_full_range(tmp_path, suffix):
    values = np.array([[0, 255, 256, 32768], [65280, 65534, 65535, 1000]], np.uint16)
    image = read_image_rgb(save(values, tmp_path / f"deep.{suffix}"))
    assert image.dtype == torch.uint8 and image.shape == (3, 2, 4)
    assert image[0].tolist() == [[0, 0, 1, 128], [255, 255, 255, 3]] and torch.equal(image[0], image[2])


def test_16_bit_colour_png_image_is_read_at_8_bits(tmp_path):
    values = np.array([[[0, 256, 65535], [512, 1000, 40000]]], np.uint16)  # (1, 2, 3)
    (tmp_path / "deep_rgb.png").write_bytes(png_bytes(values, colour_type=2))
    assert read_image_rgb(tmp_path / "deep_rgb.png")[:, 0].T.tolist() == [[0, 1, 255], [2, 3, 156]]


def test_32_bit_tiff_image_is_refused(tmp_path):
    path = save(np.array([[0, 70000]], np.int32), tmp_path / "wide.tif")
    with pytest.raises(DatasetError, match=r"wide\.tif has 32-bit pixels .* 8-bit or 16-bit"):
        read_image_rgb(path)


# Masks: what is read


@pytest.mark.parametrize("suffix", ["png", "tif"])
@pytest.mark.parametrize("values", ["labels", "0/65535"])
def test_16_bit_masks_count_every_non_zero_value_as_foreground(tmp_path, suffix, values):
    array = LABELS if values == "labels" else FOREGROUND.astype(np.uint16) * 65535
    path = save(array, tmp_path / f"mask.{suffix}")
    assert Image.open(path).mode == "I;16"
    mask = read_mask(path)
    assert mask.dtype == torch.uint8 and np.array_equal(mask.numpy(), FOREGROUND)


@pytest.mark.parametrize("step", [1, 60])
def test_8_bit_label_and_grey_level_masks_count_every_non_zero_value_as_foreground(tmp_path, step):
    labels = np.minimum(LABELS, 3).astype(np.uint8) * step  # 0, 1, 2, 3 or 0, 60, 120, 180
    assert np.array_equal(read_mask(save(labels, tmp_path / "labels.png")).numpy(), FOREGROUND)
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)  # 256 distinct values: once refused as not binary
    assert read_mask(save(ramp, tmp_path / "ramp.png")).sum() == 255


def test_mask_kinds_read_from_their_grey_or_colour_values(tmp_path):
    grey = FOREGROUND * 255
    colour_grey = np.stack([grey] * 3, axis=-1)
    opaque = np.dstack([colour_grey, np.full((4, 4), 255, np.uint8)])
    painted = np.dstack([colour_grey, grey])  # white shapes, transparent background
    inverted_palette = Image.frombytes("P", (4, 4), (1 - FOREGROUND).tobytes())
    inverted_palette.putpalette([255, 255, 255, 0, 0, 0])  # index 0 white: the colours, not the indices, count
    inverted_palette.save(tmp_path / "inverted_palette.png")
    files = [
        save(FOREGROUND.astype(bool), tmp_path / "bilevel.png"),
        save(grey, tmp_path / "grey_alpha.png", "LA"),
        save(colour_grey, tmp_path / "grey_as_rgb.png"),
        save(opaque, tmp_path / "opaque.png"),
        save(painted, tmp_path / "painted.png"),
        save(grey, tmp_path / "palette.png", "P"),
        tmp_path / "inverted_palette.png",
        save(colour_grey, tmp_path / "grey_as_rgb.tif"),
        premultiplied_grey_alpha_tiff(grey, np.full((4, 4), 255, np.uint8), tmp_path / "grey_alpha.tif"),
        save(LABELS.astype(np.int32), tmp_path / "labels_32bit.tif"),
    ]
    for path in files:
        assert np.array_equal(read_mask(path).numpy(), FOREGROUND), path.name


def test_16_bit_instance_masks_load_in_a_segmentation_folder(tmp_path):
    SyntheticNuclei(2, image_size=16, seed=0).save(tmp_path)
    labels = np.zeros((16, 16), np.uint16)
    labels[2:6, 2:6], labels[9:12, 4:14] = 1, 2
    save(labels, tmp_path / "masks" / "0" / "0001.png")
    assert torch.equal(SegmentationFolder(tmp_path)[1][1][0], torch.from_numpy(labels != 0).float())


# Masks: what is refused


def alpha_only_rgba():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = FOREGROUND * 255
    return rgba


def alpha_only_grey_alpha():
    return np.dstack([np.full((4, 4), 128, np.uint8), FOREGROUND * 255])


def alpha_only_white_rgba():
    rgba = np.full((4, 4, 4), 255, np.uint8)
    rgba[..., 3] = FOREGROUND * 200
    return rgba


@pytest.mark.parametrize(
    "make, what",
    [
        (alpha_only_rgba, "colour is the same \\(0\\)"),
        (alpha_only_grey_alpha, "grey is the same \\(128\\)"),
        (alpha_only_white_rgba, "colour is the same \\(255\\)"),
    ],
)
def test_mask_with_shapes_only_in_alpha_is_refused(tmp_path, make, what):
    path = save(make(), tmp_path / "alpha.png")
    with pytest.raises(DatasetError) as info:
        read_mask(path)
    message = str(info.value)
    assert f"mask {path} has its shapes only in the alpha channel" in message and "\n" not in message
    assert re.search(what, message) and "save the alpha channel as a grey image" in message


def test_colour_coded_mask_is_refused(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[0, 1], rgb[2, 2] = (255, 0, 0), (0, 255, 0)
    for path in (
        save(rgb, tmp_path / "classes.png"),
        save(rgb, tmp_path / "classes_palette.png", "P"),
        save(rgb, tmp_path / "classes.tif"),
    ):
        with pytest.raises(DatasetError) as info:
            read_mask(path)
        message = str(info.value)
        assert message.startswith(f"mask {path} is colour-coded: its red, green and blue channels differ")
        assert "(255, 0, 0) at x=1, y=0" in message and "save it as a grey image" in message
        assert "\n" not in message


@pytest.mark.parametrize("content", ["shapes", "all zero"])
def test_jpeg_mask_is_refused_with_the_reason(tmp_path, content):
    array = FOREGROUND * 255 if content == "shapes" else np.zeros((4, 4), np.uint8)
    for path in (save(array, tmp_path / "mask.jpg"), save(array, tmp_path / "jpeg_named.png", format="JPEG")):
        with pytest.raises(DatasetError, match=rf"mask {path} is a JPEG file: its lossy compression .* PNG or TIFF"):
            read_mask(path)


@pytest.mark.parametrize("colour_type, channels", [(2, 3), (4, 2), (6, 4)])  # RGB, grey + alpha, RGBA
def test_16_bit_colour_or_grey_alpha_mask_is_refused(tmp_path, colour_type, channels):
    array = np.stack([LABELS] * channels, axis=-1)
    (tmp_path / "deep.png").write_bytes(png_bytes(array, colour_type))
    with pytest.raises(DatasetError, match=r"deep\.png is a 16-bit colour or grey \+ alpha file.*save it as a grey"):
        read_mask(tmp_path / "deep.png")


# Damaged files


def damaged_files(tmp_path: Path) -> dict[str, Path]:
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    png = save(noise, tmp_path / "full.png").read_bytes()
    jpeg = save(noise, tmp_path / "full.jpg").read_bytes()
    tiff = save(noise, tmp_path / "full.tif", compression="tiff_deflate").read_bytes()
    contents = {
        "broken_header.png": b"\x89PNG\r\n\x1a\n this is not an image",
        "truncated.png": png[: len(png) // 2],
        "bad_crc.png": png[:29] + b"\0\0\0\0" + png[33:],
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.tif": tiff[: len(tiff) // 2],
        "empty.png": b"",
        "text.tif": b"not an image at all",
    }
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in contents}


@pytest.mark.parametrize("reader", [read_image_rgb, read_mask])
def test_damaged_files_are_named_in_one_line(tmp_path, reader):
    for name, path in damaged_files(tmp_path).items():
        with pytest.raises(DatasetError) as info:
            reader(path)
        message = str(info.value)
        assert message.startswith(f"cannot decode {path}: the file is corrupt or not a PNG/JPEG/TIFF image ("), name
        assert "\n" not in message, name
    with pytest.raises(DatasetError, match=rf"cannot read {tmp_path / 'missing.png'}: No such file"):
        reader(tmp_path / "missing.png")


def test_broken_png_header_gives_one_line_on_stderr(tmp_path, capsys):
    SyntheticNuclei(4, image_size=16, seed=0).save(tmp_path / "data")
    broken = tmp_path / "data" / "images" / "0001.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    argv = ["--data", str(tmp_path / "data"), "--epochs", "1", "--batch-size", "2", "--log-dir", str(tmp_path / "run")]
    assert run_cli(nested_unet.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot decode {broken}: ") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


# Writing


def test_write_png_file_round_trips_grey_and_rgb(tmp_path):
    rgb = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    write_png_file(rgb, tmp_path / "new" / "folder" / "rgb.png")
    write_png_file(rgb[:1], tmp_path / "grey.png")
    with Image.open(tmp_path / "new" / "folder" / "rgb.png") as image:
        assert image.format == "PNG" and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), rgb.permute(1, 2, 0).numpy())
    with Image.open(tmp_path / "grey.png") as image:
        assert image.mode == "L" and np.array_equal(np.asarray(image), rgb[0].numpy())
    assert torch.equal(read_image_rgb(tmp_path / "grey.png"), rgb[:1].expand(3, -1, -1))


@pytest.mark.parametrize(
    "tensor", [torch.zeros(2, 4, 4, dtype=torch.uint8), torch.zeros(1, 4, 4), torch.zeros(4, 4, dtype=torch.uint8)]
)
def test_write_png_file_refuses_other_tensors(tmp_path, tensor):
    with pytest.raises(
        ValueError, match=r"cannot write .*bad\.png: expected a uint8 \(C, H, W\) tensor with C = 1 or 3"
    ):
        write_png_file(tensor, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


# Orientation, NaN masks, entries that are no files


def with_orientation(array: np.ndarray, path: Path, orientation: int, **options) -> Path:
    """`array` saved by Pillow with an EXIF orientation tag (6: viewers turn it 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, exif=exif, **options)
    return path


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_turns_images_and_masks_alike(tmp_path, suffix):
    grey = np.zeros((20, 40), np.uint8)
    grey[:5, :10] = 255  # a block top left as stored; viewers show the picture turned to 40 high, 20 wide
    upright = np.rot90(grey, k=-1)  # orientation 6: 90 degrees clockwise, the block now top right
    image = read_image_rgb(with_orientation(np.dstack([grey] * 3), tmp_path / f"image{suffix}", 6, quality=100))
    mask = read_mask(with_orientation(grey, tmp_path / "mask.png", 6))
    assert tuple(image.shape) == (3, 40, 20) and tuple(mask.shape) == (40, 20)
    assert np.array_equal(mask.numpy(), (upright > 0).astype(np.uint8))
    assert np.array_equal(image[0].numpy() > 127, upright > 0)  # the image lands where its mask does


def test_a_square_image_and_mask_with_orientation_stay_aligned_in_a_folder(tmp_path):
    grey = np.zeros((16, 16), np.uint8)
    grey[:4, :8] = 255
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with_orientation(np.dstack([grey] * 3), tmp_path / "images" / "a.jpg", 8, quality=100)
    save(np.rot90(grey, k=1).copy(), tmp_path / "masks" / "a.png")  # the mask drawn on the picture as shown
    image, mask = SegmentationFolder(tmp_path)[0]
    assert torch.equal(image[0] > 0.5, mask[0] > 0.5)


@pytest.mark.parametrize("fill", ["all", "one"])
def test_a_float_mask_with_nan_is_refused_by_name(tmp_path, fill):
    array = np.full((8, 8), np.nan, np.float32) if fill == "all" else np.eye(8, dtype=np.float32)
    if fill == "one":
        array[3, 5] = np.nan
    path = save(array, tmp_path / "nan.tif")
    with pytest.raises(
        DatasetError,
        match=rf"mask {path} has NaN values \((64|1) pixels?, e\.g\. at x=(0|5), "
        r"y=(0|3)\), which are neither background nor foreground",
    ):
        read_mask(path)


def test_a_fifo_is_refused_by_name_without_being_opened(tmp_path):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    for reader in (read_image_rgb, read_mask):  # opening it would block until a writer came
        with pytest.raises(DatasetError, match=rf"cannot read {fifo}: it is a FIFO, not an image file"):
            reader(fifo)
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(DatasetError, match="gone.png: it is a dangling symbolic link"):
        read_image_rgb(tmp_path / "gone.png")
