"""Prediction on whole images: the trained scale, any size, blended tiles, mixed folders, errors.

The whole-image test trains a UNet through the recipe on 32x32 tiles cut from the left part of a
large synthetic image and predicts the whole image: its right part must score like the held-out
tiles did in validation.
"""

from __future__ import annotations

import math
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.io import decode_png, read_file

from models import UNet
from models.predict import (
    blend_window,
    count_outputs,
    count_windows,
    default_overlap,
    plan_windows,
    predict_batch,
    predict_image,
    side_weights,
    to_model_input,
)
from recipes import nested_unet
from recipes.cli import run_cli
from recipes.errors import UsageError
from recipes.nested_unet import NestedUNetRecipe
from recipes.prediction import inference_precision
from recipes.prediction_files import output_paths
from recipes.segmentation_model import load_trained_model
from tests.helpers import undocumented_options
from trainer.checkpoint import load_checkpoint
from trainer_datasets import SegmentationFolder, SyntheticNuclei, read_image_rgb, write_png_file

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

CELL = 64  # the big image is a mosaic of 6 x 8 synthetic 64x64 fields
ROWS, COLS = 6, 8  # 384 x 512 pixels
SPLIT = 256  # tiles for training come from columns < SPLIT, the held-out region is the rest
SIDE = 64  # training and validation tile side, as in the usual workflow (and the issue it fixes)
TRAIN_TILES = 128  # 4 epochs of 16 steps at batch 8


def run(argv):
    return run_cli(nested_unet.main, argv)


def read_png(path):
    return decode_png(read_file(str(path)))


def predict_cli(checkpoint, images, out, *extra):
    return run(["predict", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out), *extra])


def iou(predicted, truth):
    predicted, truth = predicted.bool(), truth.bool()
    return ((predicted & truth).sum() / (predicted | truth).sum()).item()


def mosaic(seed=21):
    """A 384x512 uint8 image with about 300 nuclei and its mask (1, 384, 512) of 0/1."""
    fields = SyntheticNuclei(ROWS * COLS, image_size=CELL, seed=seed, min_nuclei=4, max_nuclei=10)
    image = fields.images.view(ROWS, COLS, 3, CELL, CELL).permute(2, 0, 3, 1, 4).reshape(3, ROWS * CELL, COLS * CELL)
    mask = fields.masks.view(ROWS, COLS, 1, CELL, CELL).permute(2, 0, 3, 1, 4).reshape(1, ROWS * CELL, COLS * CELL)
    return image.contiguous(), mask.contiguous()


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """A recipe run trained on tiles of the big image's left part, validated on tiles of its right
    part, and the big image itself in a folder."""
    root = tmp_path_factory.mktemp("whole")
    image, mask = mosaic()
    g = torch.Generator().manual_seed(0)
    for i in range(TRAIN_TILES):
        y = int(torch.randint(0, image.shape[1] - SIDE + 1, (), generator=g))
        x = int(torch.randint(0, SPLIT - SIDE + 1, (), generator=g))
        write_png_file(image[:, y : y + SIDE, x : x + SIDE], root / "data/train/images" / f"{i:04d}.png")
        write_png_file(mask[:, y : y + SIDE, x : x + SIDE] * 255, root / "data/train/masks" / f"{i:04d}.png")
    for i, (y, x) in enumerate(
        (y, x) for y in range(0, image.shape[1], SIDE) for x in range(SPLIT, image.shape[2], SIDE)
    ):
        write_png_file(image[:, y : y + SIDE, x : x + SIDE], root / "data/val/images" / f"{i:04d}.png")
        write_png_file(mask[:, y : y + SIDE, x : x + SIDE] * 255, root / "data/val/masks" / f"{i:04d}.png")
    write_png_file(image, root / "images" / "big.png")
    assert (
        run(
            [
                "--data",
                str(root / "data"),
                "--arch",
                "UNet",
                "--base-filters",
                "16",
                "--batch-size",
                "8",
                "--epochs",
                "4",
                "--precision",
                "32",
                "--channels-last",
                "off",
                "--log-dir",
                str(root / "run"),
            ]
        )
        == 0
    )
    return {"root": root, "checkpoint": root / "run" / "best.pt", "image": image, "mask": mask}


@pytest.mark.numerics
def test_whole_image_scores_like_the_validation_tiles(whole, capsys):
    state = load_checkpoint(whole["checkpoint"])
    assert state["config"]["image_size"] is None  # trained on the tiles at their own resolution
    tile_iou = max(logs["val_iou"] for logs in state["history"])
    out = whole["root"] / "pred"
    assert predict_cli(whole["checkpoint"], whole["root"] / "images", out) == 0
    captured = capsys.readouterr()
    assert "each image at its own resolution, as the run trained" in captured.out
    assert "100%" in captured.err and "1 image:" in captured.err  # the progress bar
    mask = read_png(out / "big_mask.png")
    assert mask.shape == (1, 384, 512)
    held_out = iou(mask[:, :, SPLIT:] > 0, whole["mask"][:, :, SPLIT:])
    print(f"measured: validation IoU on {SIDE}x{SIDE} tiles {tile_iou:.4f}, whole-image IoU {held_out:.4f}")
    assert tile_iou > 0.7
    assert abs(held_out - tile_iou) < 0.05

    # The failure this replaces: the whole image squeezed to the training side.
    squeezed = whole["root"] / "squeezed"
    assert predict_cli(whole["checkpoint"], whole["root"] / "images", squeezed, "--image-size", str(SIDE)) == 0
    mask = read_png(squeezed / "big_mask.png")
    assert mask.shape == (1, 384, 512)
    squeezed_iou = iou(mask[:, :, SPLIT:] > 0, whole["mask"][:, :, SPLIT:])
    print(f"measured: whole-image IoU after squeezing to {SIDE}x{SIDE}: {squeezed_iou:.4f}")
    assert squeezed_iou < tile_iou - 0.3


def load_model(checkpoint):
    return NestedUNetRecipe().load_trained_model(checkpoint).model


@pytest.mark.numerics
def test_tiled_and_whole_predictions_agree(whole):
    model = load_model(whole["checkpoint"])
    image = whole["image"]
    untiled = predict_image(model, image, tile=512)
    tiled = predict_image(model, image, tile=256, overlap=128)
    assert count_windows(384, 512, tile=256, overlap=128) == 2 * 3
    difference = (tiled - untiled).abs()
    disagree = ((tiled > 0.5) != (untiled > 0.5)).float().mean().item()
    print(
        f"measured: tiled vs whole: max |p| difference {difference.max():.4f}, mean {difference.mean():.5f}, "
        f"mask pixels that differ {disagree:.4%}"
    )
    assert difference.mean() < 0.01 and disagree < 0.01
    iou_change = iou(tiled[:, :, SPLIT:] > 0.5, whole["mask"][:, :, SPLIT:]) - iou(
        untiled[:, :, SPLIT:] > 0.5, whole["mask"][:, :, SPLIT:]
    )
    print(f"measured: IoU tiled minus whole {iou_change:+.5f}")
    assert abs(iou_change) < 0.01

    # The U-Nets upsample with align_corners=True, which ties their geometry to the input's size:
    # no crop of an image predicts exactly as the whole does (hence the differences above). With a
    # size-independent upsampling the same weights are shift-equivariant, and the blended tiles
    # match the whole image but for the edge effects left beyond the dropped margin (zero padding
    # at a window's edge reaches 60-80 pixels into a trained U-Net)...
    model.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
    untiled = predict_image(model, image, tile=512)
    tiled = predict_image(model, image, tile=256, overlap=128)
    difference = (tiled - untiled).abs()
    disagree = ((tiled > 0.5) != (untiled > 0.5)).float().mean().item()
    print(
        f"measured: shift-equivariant upsampling: max |p| difference {difference.max():.4f}, "
        f"mean {difference.mean():.6f}, mask pixels that differ {disagree:.4%}"
    )
    assert difference.max() < 0.2 and difference.mean() < 0.0005 and disagree < 0.0002
    # ...while tiles that merely abut show their zero-padded edges as seams.
    seams = (predict_image(model, image, tile=256, overlap=0) - untiled).abs()
    print(f"measured: abutting tiles: max |p| difference {seams.max():.4f}, mean {seams.mean():.6f}")
    # Measured: seams 14-38x (max) and 37-48x (mean) the blended tiles' differences under native,
    # AVX2 and default kernels with the recipe's warm-up and cosine (310x and 200x with the per-epoch
    # cosine it had before: how far edge effects reach depends on the training).
    assert seams.max() > 5 * difference.max() and seams.mean() > 10 * difference.mean()


class SmallFCN(nn.Module):
    """Three 3x3 convolutions: a fully convolutional net whose receptive field reaches 3 pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 2, 3, padding=1),
        )
        self.sides = []

    def forward(self, x):
        self.sides.append(tuple(x.shape))
        return self.body(x)


@pytest.mark.numerics
def test_tiles_are_exact_where_the_receptive_field_fits_the_dropped_margin():
    torch.manual_seed(0)
    model = SmallFCN()
    image = torch.rand(3, 100, 150)
    whole = predict_image(model, image, tile=256)
    assert model.sides == [(1, 3, 112, 160)]  # padded to multiples of 16, one pass
    model.sides.clear()
    tiled = predict_image(model, image, tile=32, overlap=16)  # 4 dropped pixels per inner edge > 3
    assert tiled.shape == whole.shape == (2, 100, 150)
    print(f"measured: tiled vs whole, max |p| difference {(tiled - whole).abs().max():.2e}")
    torch.testing.assert_close(tiled, whole, atol=1e-6, rtol=0)
    windows = len(plan_windows(112, 32, 16)) * len(plan_windows(160, 32, 16))
    assert len(model.sides) == count_windows(100, 150, tile=32, overlap=16) == windows == 6 * 9
    assert all(shape[-2:] == (32, 32) for shape in model.sides)
    assert all(shape[0] == 1 for shape in model.sides)  # a pass holds at most tile * tile pixels

    # Without overlap the windows' zero-padded edges show as seams.
    seams = predict_image(model, image, tile=32, overlap=0)
    print(f"measured: abutting tiles, max |p| difference {(seams - whole).abs().max():.4f}")
    assert (seams - whole).abs().max() > 1e-3


@pytest.mark.parametrize(
    "length, tile, overlap",
    [(16, 512, 128), (512, 512, 128), (528, 512, 128), (4096, 512, 128), (1008, 256, 100), (400, 64, 0), (96, 32, 16)],
)
def test_windows_cover_the_side_on_the_pooling_grid_and_blend_to_one(length, tile, overlap):
    starts = plan_windows(length, tile, overlap)
    size = min(tile, length)
    assert starts[0] == 0 and starts[-1] == length - size
    assert all(start % 16 == 0 for start in starts)
    assert all(0 < b - a <= size - overlap for a, b in zip(starts, starts[1:]))  # at least `overlap` shared
    full = torch.zeros(length)
    for start, weights in zip(starts, side_weights(starts, size, length, overlap)):
        full[start : start + size] = torch.maximum(full[start : start + size], weights)
    assert (full == 1).all()  # every pixel has one window at full weight: no division by ~0


def test_blend_window_drops_the_outer_quarter_and_rises_smoothly():
    weights = blend_window(64, 32, fade_start=True, fade_end=False)
    assert (weights[:16] == 0).all() and (weights[32:] == 1).all()
    rise = weights[16:32]
    assert (rise.diff() > 0).all() and 0 < rise[0] < 0.05 and rise[-1] > 0.95
    assert torch.equal(blend_window(64, 32, False, True), weights.flip(0))
    assert torch.equal(blend_window(64, 0, True, True), torch.ones(64))


def test_predict_batch_checks_its_arguments():
    model = SmallFCN()
    images = torch.rand(1, 3, 32, 32)
    for kwargs, message in [
        ({"tile": 100}, "tile must be a multiple of 16"),
        ({"overlap": 512}, "overlap must be an integer >= 0 and smaller than the tile"),
        ({"precision": "fp8"}, "precision must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            predict_batch(model, images, **kwargs)
    with pytest.raises(ValueError, match="expected a float batch"):
        predict_batch(model, images.to(torch.uint8))


@pytest.mark.numerics
def test_small_tiles_get_an_overlap_they_can_hold():
    """A tile below twice the default overlap needs no --overlap: half the tile is used."""
    assert default_overlap(512) == default_overlap(256) == 128
    assert default_overlap(128) == 64 and default_overlap(48) == 16 and default_overlap(16) == 0
    model = SmallFCN()
    image = torch.rand(3, 100, 150)
    torch.testing.assert_close(
        predict_image(model, image, tile=64), predict_image(model, image, tile=256), atol=1e-6, rtol=0
    )
    assert count_windows(100, 150, tile=64) == len(plan_windows(112, 64, 32)) * len(plan_windows(160, 64, 32))


def test_predict_image_restores_the_eval_train_mode_and_runs_without_grad():
    model = SmallFCN().train()
    grads = []
    model.register_forward_hook(lambda module, inputs, output: grads.append((module.training, torch.is_grad_enabled())))
    probabilities = predict_image(model, torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8))
    assert grads == [(False, False)] and model.training
    assert probabilities.shape == (2, 20, 30) and not probabilities.requires_grad
    assert 0 <= probabilities.min() and probabilities.max() <= 1


def test_count_outputs_reads_num_classes_or_runs_the_model_once():
    model = SmallFCN()  # keeps no num_classes: one forward pass on zeros tells
    assert count_outputs(model) == 2 and model.sides == [(1, 3, 64, 64)]
    assert count_outputs(UNet(num_classes=3, base_filters=4)) == 3
    deep = nn.Sequential(SmallFCN())
    deep.forward = lambda x: [torch.zeros(1, 4, 8, 8), torch.zeros(1, 5, 8, 8)]  # deep supervision: the last
    assert count_outputs(deep) == 5


@pytest.mark.numerics
def test_precision_and_channels_last_reach_the_forward_pass():
    model = SmallFCN()
    seen = []
    model.register_forward_pre_hook(
        lambda module, inputs: seen.append(
            (
                torch.is_autocast_enabled("cpu"),
                torch.get_autocast_dtype("cpu"),
                inputs[0].is_contiguous(memory_format=torch.channels_last),
            )
        )
    )
    image = torch.rand(3, 32, 48)
    plain = predict_image(model, image)
    fast = predict_image(model, image, precision="bf16", channels_last=True)
    assert seen[0][0] is False and seen[0][2] is False
    assert seen[1] == (True, torch.bfloat16, True)
    print(f"measured: bf16 channels-last vs float32, max |p| difference {(fast - plain).abs().max():.4f}")
    assert fast.dtype == torch.float32 and (fast - plain).abs().max() < 0.05


@pytest.mark.parametrize(
    "trained, native, expected",
    [("bf16", True, "bf16"), ("bf16", False, "32"), ("32", True, "32"), ("16-mixed", False, "32")],
)
def test_inference_precision_follows_the_run_where_the_cpu_computes_it(mocker, trained, native, expected):
    mocker.patch("recipes.prediction.native_bf16", return_value=native)
    precision, reason = inference_precision({"precision": trained}, torch.device("cpu"))
    assert precision == expected and reason


# --- the command line on small checkpoints -------------------------------------------------------


@pytest.fixture(scope="module")
def resized_run(tmp_path_factory):
    """A tiny run trained on images resized to 32x32."""
    run_dir = tmp_path_factory.mktemp("resized") / "run"
    assert (
        run(
            [
                "--arch",
                "UNet",
                "--base-filters",
                "4",
                "--train-samples",
                "8",
                "--val-samples",
                "4",
                "--image-size",
                "32",
                "--batch-size",
                "4",
                "--epochs",
                "1",
                "--precision",
                "32",
                "--channels-last",
                "off",
                "--log-dir",
                str(run_dir),
            ]
        )
        == 0
    )
    return run_dir / "last.pt"


@pytest.fixture(scope="module")
def native_run(tmp_path_factory):
    """A tiny run trained on a folder of 32x32 images at their own resolution."""
    root = tmp_path_factory.mktemp("native")
    SyntheticNuclei(6, image_size=32, seed=3).save(root / "data")
    assert (
        run(
            [
                "--data",
                str(root / "data"),
                "--arch",
                "UNet",
                "--base-filters",
                "4",
                "--batch-size",
                "4",
                "--epochs",
                "1",
                "--precision",
                "32",
                "--channels-last",
                "off",
                "--log-dir",
                str(root / "run"),
            ]
        )
        == 0
    )
    return root / "run" / "last.pt"


@pytest.fixture
def forward_sides(mocker):
    """The (N, C, H, W) shape of every batch UNet.forward gets."""
    spy = mocker.spy(UNet, "forward")
    return lambda: [tuple(call.args[1].shape) for call in spy.call_args_list]


def random_image(height, width, channels=3, seed=0):
    return torch.randint(
        0, 256, (channels, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def save_pil(array, path):
    Image.fromarray(array).save(path)


def mixed_folder(root):
    """Grey, RGB, RGBA, 8- and 16-bit images of sizes that are not multiples of 16, as PNG, JPEG and TIFF."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_png_file(random_image(37, 53, channels=1), root / "grey8.png")
    save_pil(rng.integers(0, 256, (40, 56, 4), dtype=np.uint8), root / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (20, 90, 2), dtype=np.uint8), mode="LA").save(root / "grey_alpha.png")
    save_pil(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), root / "photo.jpg")
    save_pil(rng.integers(0, 65536, (50, 70), dtype=np.uint16), root / "grey16.png")
    save_pil(rng.integers(0, 65536, (33, 17), dtype=np.uint16), root / "grey16_tif.tif")
    save_pil(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), root / "rgb.tiff")
    write_png_file(random_image(5, 7), root / "tiny.png")  # too small to reflect: edge pixels repeat
    (root / "notes.txt").write_text("not an image: skipped")
    (root / ".hidden.png").write_bytes(b"not an image either: hidden files are skipped")
    return {
        "grey8": (37, 53),
        "grey_alpha": (20, 90),
        "rgba": (40, 56),
        "photo": (48, 64),
        "grey16": (50, 70),
        "grey16_tif": (33, 17),
        "rgb": (40, 56),
        "tiny": (5, 7),
    }


@pytest.mark.numerics
def test_mixed_folder_predicts_in_one_command_at_each_images_size(native_run, tmp_path, forward_sides):
    images = tmp_path / "images"
    sizes = mixed_folder(images)
    out = tmp_path / "out"
    assert predict_cli(native_run, images, out) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{name}_{kind}.png" for name in sizes for kind in ("mask", "prob")
    )
    model = load_model(native_run)
    for name, size in sizes.items():
        mask, prob = read_png(out / f"{name}_mask.png"), read_png(out / f"{name}_prob.png")
        assert mask.shape == prob.shape == (1, *size)  # cropped back exactly
        assert set(mask.unique().tolist()) <= {0, 255}
        path = next(images.glob(f"{name}.*"))
        expected = predict_image(model, read_image_rgb(path))  # the library call gives the same maps
        largest = (prob.float() - expected.mul(255).round()).abs().max().item()
        print(f"measured: {name}: largest difference from the library call {largest:.0f}/255")
        assert largest <= 1
    # Same-sized images share a forward pass: rgba.png and rgb.tiff are both 40x56 (padded 48x64).
    assert sorted(forward_sides()[: len(sizes) - 1]) == sorted(
        [(1, 3, 48, 64), (1, 3, 48, 64), (2, 3, 48, 64), (1, 3, 64, 80), (1, 3, 48, 32), (1, 3, 32, 96), (1, 3, 16, 16)]
    )


def test_a_small_tile_on_the_command_line_takes_half_of_it_as_overlap(native_run, tmp_path, capsys):
    images = tmp_path / "images"
    write_png_file(random_image(100, 150), images / "a.png")
    assert predict_cli(native_run, images, tmp_path / "out", "--tile", "64") == 0
    out = capsys.readouterr().out
    assert "tiles up to 64x64, overlap 32" in out
    assert f"wrote 1 probability map and 1 mask to {tmp_path / 'out'}\n" in out  # counted, not "1 ... maps"
    assert read_png(tmp_path / "out" / "a_mask.png").shape == (1, 100, 150)


def test_the_checkpoints_scale_and_its_overrides(resized_run, native_run, tmp_path, forward_sides):
    images = tmp_path / "images"
    write_png_file(random_image(40, 56), images / "a.png")
    write_png_file(random_image(40, 56, seed=1), images / "b.png")
    write_png_file(random_image(24, 24, seed=2), images / "c.png")
    cases = [
        (resized_run, [], [(3, 3, 32, 32)]),  # as trained: all 32x32, one batch
        (resized_run, ["--scale", "native"], [(2, 3, 48, 64), (1, 3, 32, 32)]),  # own sizes, padded
        (resized_run, ["--image-size", "48"], [(3, 3, 48, 48)]),
        (native_run, [], [(2, 3, 48, 64), (1, 3, 32, 32)]),
        (native_run, ["--image-size", "64"], [(3, 3, 64, 64)]),
    ]
    for index, (checkpoint, extra, sides) in enumerate(cases):
        before = len(forward_sides())
        out = tmp_path / f"out{index}"
        assert predict_cli(checkpoint, images, out, *extra) == 0
        assert forward_sides()[before:] == sides, extra
        assert read_png(out / "a_prob.png").shape == (1, 40, 56) and read_png(out / "c_mask.png").shape == (1, 24, 24)


def test_resizing_follows_the_training_readers_rule(resized_run, tmp_path, mocker):
    """The input of a resized prediction is the image the training reader makes of the same file."""
    data = tmp_path / "data"
    write_png_file(random_image(45, 70), data / "images" / "x.png")
    write_png_file(torch.zeros(1, 45, 70, dtype=torch.uint8), data / "masks" / "x.png")
    spy = mocker.spy(UNet, "forward")
    assert predict_cli(resized_run, data / "images", tmp_path / "out") == 0
    seen = spy.call_args_list[0].args[1][0]
    trained = SegmentationFolder(data, image_size=32)[0][0]
    assert torch.equal(seen, trained)
    assert torch.equal(to_model_input(read_image_rgb(data / "images" / "x.png"), 32), trained)


def test_bad_files_are_named_in_one_error_and_nothing_is_written(native_run, tmp_path, capsys):
    images = tmp_path / "images"
    write_png_file(random_image(32, 32), images / "good.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (images / "empty.tif").write_bytes(b"")
    write_png_file(random_image(32, 32), images / "twice.png")
    save_pil(np.zeros((8, 8), dtype=np.uint8), images / "twice.tif")
    out = tmp_path / "out"
    assert predict_cli(native_run, images, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: 3 of the 5 images")
    assert "broken.png" in err and "empty.tif" in err and "twice.png and twice.tif share the id 'twice'" in err
    assert "good.png" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--scale", "native", "--image-size", "32"], "argument --image-size: not allowed with argument --scale"),
        (["--tile", "100"], "--tile 100 is not a multiple of 16; try 96"),
        (["--overlap", "512"], "--overlap 512 must be smaller than --tile 512"),
        (["--scale", "half"], "argument --scale: invalid choice"),
    ],
)
def test_bad_prediction_options_are_one_line(native_run, tmp_path, capsys, extra, message):
    images = tmp_path / "images"
    write_png_file(random_image(32, 32), images / "a.png")
    try:
        code = predict_cli(native_run, images, tmp_path / "out", *extra)
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_predict_help_names_every_option():
    text = NestedUNetRecipe().build_predict_parser().format_help()
    for option in (
        "--checkpoint",
        "--images",
        "--out",
        "--threshold",
        "--device",
        "--scale",
        "--image-size",
        "--tile",
        "--overlap",
    ):
        assert option in text
    assert undocumented_options(NestedUNetRecipe().build_predict_parser()) == []


@pytest.mark.parametrize(
    "classes, labels, probabilities",
    [(["x"], False, False), (["x", "y"], False, False), (["x", "y"], True, False), (["x", "y"], True, True)],
)
def test_predict_help_names_the_files_each_kind_of_run_writes(classes, labels, probabilities):
    """The help of --out names the files `output_paths` gives for one class, several and label maps."""
    action = next(a for a in NestedUNetRecipe().build_predict_parser()._actions if "--out" in a.option_strings)
    out = Path("OUT")
    for path in output_paths(out, "ID", classes, labels, probabilities):
        parts = ["<class>" if part in classes else part.replace("ID", "<id>") for part in path.relative_to(out).parts]
        assert "/".join(parts) in action.help


def test_a_large_image_goes_through_the_model_one_tile_at_a_time():
    """What bounds memory: a 2048x2048 input reaches the model as 512x512 windows, one per pass."""
    model = SmallFCN()
    image = torch.rand(3, 2048, 2048)
    probabilities = predict_batch(model, image[None], tile=512, overlap=128)
    assert probabilities.shape == (1, 2, 2048, 2048)
    assert len(model.sides) == count_windows(2048, 2048) == math.prod([len(plan_windows(2048, 512, 128))] * 2)
    assert all(side == (1, 3, 512, 512) for side in model.sides)


def test_entries_that_are_no_files_are_named_and_system_files_left_out_as_in_training(native_run, tmp_path, capsys):
    images = tmp_path / "images"
    write_png_file(random_image(32, 32), images / "good.png")
    for name in ("Thumbs.db", "desktop.ini", ".DS_Store"):  # left out by training too
        (images / name).write_bytes(b"written by a file manager")
    out = tmp_path / "out"
    assert predict_cli(native_run, images, out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["good_mask.png", "good_prob.png"]
    capsys.readouterr()
    os.mkfifo(images / "fifo.png")  # opening it would block for ever
    (images / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (images / "loop.png").symlink_to(images / "loop.png")
    assert predict_cli(native_run, images, tmp_path / "out2") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"error: --images {str(images)!r} holds entries that are not image "
        "files, nothing written: fifo.png is a FIFO; gone.png is a "
        "dangling symbolic link; loop.png is a symbolic link loop"
    )
    assert not (tmp_path / "out2").exists()


# --- checkpoints of other recipes ----------------------------------------------------------------


class OwnNet(nn.Module):
    """A user's segmentation network (allowed only when passed)."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.head = nn.Conv2d(3, num_classes, 3, padding=1)

    def forward(self, x):
        return self.head(x)


def own_run(run_dir, model, data):
    """A run of a recipe of one's own: a Trainer with ModelCheckpoint, other metric names."""
    from trainer import Trainer
    from trainer.callbacks import ModelCheckpoint

    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=g)
    masks = (images[:, :2] > 0.5).float()[:, : model.num_classes]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, masks), batch_size=2)
    Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        nn.BCEWithLogitsLoss(),
        max_epochs=1,
        device="cpu",
        metrics={"overlap": lambda p, t: ((p > 0) == t.bool()).float().mean()},
        callbacks=[ModelCheckpoint(run_dir, monitor="val_overlap", mode="max", data=data, config={"lr": 0.01})],
    ).fit(loader, loader)
    return run_dir / "best.pt"


def test_predict_takes_the_checkpoint_of_a_recipe_of_ones_own(tmp_path, capsys):
    data = {"classes": ["cell", "edge"], "image_size": 32, "mask_type": "binary"}
    checkpoint = own_run(tmp_path / "run", UNet(num_classes=2), data)
    images = tmp_path / "images"
    images.mkdir()
    write_png_file(random_image(40, 24), images / "a.png")
    assert predict_cli(checkpoint, images, tmp_path / "out") == 0
    assert "every image resized to 32x32, as the run trained" in capsys.readouterr().out
    for name in ("cell", "edge"):
        assert read_png(tmp_path / "out" / name / "a.png").shape == (1, 40, 24)
        assert (tmp_path / "out" / name / "a_prob.png").is_file()


def test_predict_says_what_another_checkpoint_is_and_lacks(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    write_png_file(random_image(32, 32), images / "a.png")
    no_classes = own_run(tmp_path / "bare", UNet(num_classes=1), {})
    assert predict_cli(no_classes, images, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "older" not in err
    assert f"{no_classes} (a checkpoint of UNet) records no class names (no 'classes' in its data or config)" in err

    own = own_run(tmp_path / "own", OwnNet(), {"classes": ["a", "b"], "mask_type": "binary"})
    assert predict_cli(own, images, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(
        r"names the model class (tests\.)?test_predict\.OwnNet .*not allowed", err
    )
    trained = load_trained_model(own, allowed=[OwnNet])
    assert isinstance(trained.model, OwnNet) and trained.classes == ["a", "b"] and trained.image_size is None
    assert not (tmp_path / "out").exists()


def without_mask_type(state):
    """`state` with no ``mask_type`` in its data or configuration, as a run that did not record it wrote it."""
    state["data"].pop("mask_type", None)
    state["config"].pop("mask_type", None)
    return state


@pytest.mark.parametrize("mask_type", [None, "multilabel"], ids=["missing", "unknown"])
def test_a_checkpoint_that_does_not_say_how_its_outputs_are_read_is_refused(two_classes, tmp_path, capsys, mask_type):
    """Predict never guesses between a softmax label map and a sigmoid per class: a file whose data
    names its classes but no known mask_type is refused in one line saying what to record, by the
    command and by `load_trained_model`, and nothing is written."""
    state = without_mask_type(load_checkpoint(two_classes))
    if mask_type is not None:
        state["data"]["mask_type"] = mask_type
    checkpoint = tmp_path / "unsaid.pt"
    torch.save(state, checkpoint)
    write_png_file(random_image(32, 32), tmp_path / "images" / "a.png")
    assert predict_cli(checkpoint, tmp_path / "images", tmp_path / "out") == 2
    err = capsys.readouterr().err
    said = (
        "does not record how its outputs are read (no 'mask_type' in its data)"
        if mask_type is None
        else "records mask_type 'multilabel', which predict does not read"
    )
    assert err.count("\n") == 1 and f"{checkpoint} (a checkpoint of UNet) {said}; record data['mask_type']" in err
    assert "'labels' for a softmax over the classes" in err and "'binary' for a sigmoid per class" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match=re.escape(said)):
        NestedUNetRecipe().load_trained_model(checkpoint)


def test_only_this_recipes_files_from_before_label_maps_are_read_as_binary(resized_run, tmp_path):
    """A file of this recipe from before checkpoints recorded their model, and from before label
    maps, could only hold binary masks: it is read so. The same file with its model recorded
    says nothing about its outputs, and is refused."""
    state = without_mask_type(load_checkpoint(resized_run))
    assert state["config"]["arch"] == "UNet"
    recorded = tmp_path / "recorded.pt"
    torch.save(state, recorded)
    with pytest.raises(UsageError, match="does not record how its outputs are read"):
        NestedUNetRecipe().load_trained_model(recorded)
    for key in ("format_version", "model_spec", "data"):
        del state[key]
    legacy = tmp_path / "legacy.pt"
    torch.save(state, legacy)
    trained = NestedUNetRecipe().load_trained_model(legacy)
    assert isinstance(trained.model, UNet) and trained.mask_type == "binary" and trained.classes == ["nucleus"]


def test_export_writes_a_weights_only_file_that_predict_and_load_model_read(resized_run, tmp_path, capsys):
    from trainer import load_model
    from trainer.trained_model import MODEL_KEYS

    exported = tmp_path / "model.pt"
    assert run(["export", "--checkpoint", str(resized_run), "--out", str(exported)]) == 0
    assert set(load_checkpoint(exported)) == set(MODEL_KEYS)
    assert exported.stat().st_size < resized_run.stat().st_size / 2  # no Adam moments
    assert isinstance(load_model(exported), UNet)
    images = tmp_path / "images"
    images.mkdir()
    write_png_file(random_image(32, 32), images / "a.png")
    assert predict_cli(exported, images, tmp_path / "out") == 0
    assert (tmp_path / "out" / "a_mask.png").is_file()
    capsys.readouterr()
    assert run(["export", "--checkpoint", str(resized_run), "--out", str(exported)]) == 2
    assert "exists already" in capsys.readouterr().err


# --- writes stay inside --out --------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory):
    """A checkpoint of a UNet with two outputs, named cell and edge (a recipe of one's own)."""
    root = tmp_path_factory.mktemp("two_classes")
    return own_run(
        root / "run", UNet(num_classes=2, base_filters=4), {"classes": ["cell", "edge"], "mask_type": "binary"}
    )


def crafted(checkpoint, path, **data):
    """A copy of `checkpoint` at `path` whose ``data`` records `data` instead: a file anyone can write."""
    state = load_checkpoint(checkpoint)
    state["data"].update(data)
    torch.save(state, path)
    return path


def snapshot(folder):
    """Every file and folder under `folder` (hidden ones too) with its size and modification time."""
    return {
        str(path.relative_to(folder)): (path.is_dir(), path.lstat().st_size, path.lstat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
    }


@pytest.fixture
def workspace(tmp_path):
    """A folder holding images/a.png, a training data folder data/ (images/ and masks/cell/) and
    nothing else; predictions go to out/ inside it."""
    write_png_file(random_image(32, 32), tmp_path / "images" / "a.png")
    write_png_file(random_image(32, 32, seed=1), tmp_path / "data" / "images" / "a.png")
    write_png_file(torch.zeros(1, 32, 32, dtype=torch.uint8), tmp_path / "data" / "masks" / "cell" / "a.png")
    return tmp_path


@pytest.mark.parametrize(
    "name",
    ["../data/masks/cell", "../x", "ABSOLUTE", "a/b", "a\\b", ".", "..", "a\x00b", "a\x1bb", ""],
    ids=["ground-truth", "parent", "absolute", "slash", "backslash", "dot", "dotdot", "nul", "escape", "empty"],
)
def test_class_names_that_are_no_folder_name_are_refused_and_nothing_is_written(two_classes, workspace, capsys, name):
    name = str(workspace / "elsewhere") if name == "ABSOLUTE" else name
    checkpoint = crafted(two_classes, workspace / "crafted.pt", classes=["cell", name])
    before = snapshot(workspace)
    out = workspace / "out"
    assert predict_cli(checkpoint, workspace / "images", out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{checkpoint} (a checkpoint of UNet) records the class name {name!r} (class 1), which " in err
    assert snapshot(workspace) == before and not out.exists()  # ground truth and the parent folder as they were
    with pytest.raises(UsageError, match="records the class name"):
        NestedUNetRecipe().load_trained_model(checkpoint)


def test_an_output_folder_that_links_outside_out_is_refused(two_classes, workspace, capsys):
    out = workspace / "out"
    (workspace / "elsewhere").mkdir()
    out.mkdir()
    (out / "cell").symlink_to(workspace / "elsewhere")
    before = snapshot(workspace)
    assert predict_cli(two_classes, workspace / "images", out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the output folder {out / 'cell'} leads to {workspace / 'elsewhere'}" in err
    assert snapshot(workspace) == before

    (out / "cell").unlink()  # a link into the data folder's ground truth
    (out / "cell").symlink_to(workspace / "data" / "masks" / "cell")
    assert predict_cli(two_classes, workspace / "images", out, "--overwrite") == 2
    assert "outside --out" in capsys.readouterr().err

    (out / "cell").unlink()  # a link to another output folder: cell's and edge's outputs would be one file
    (out / "edge").mkdir()
    (out / "cell").symlink_to(out / "edge")
    before = snapshot(workspace)
    assert predict_cli(two_classes, workspace / "images", out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the output folders {out / 'cell'} and {out / 'edge'} are one folder" in err
    assert snapshot(workspace) == before


@pytest.mark.parametrize(
    "images, mask_type, classes, extra, message",
    [
        (
            ["cell", "cell_prob"],
            "binary",
            ["cell", "edge"],
            ["--probabilities"],
            "cell/cell_prob.png is planned twice: cell.png and cell_prob.png would both write it (the probability "
            "map of class 'cell' of cell.png, the mask of class 'cell' of cell_prob.png)",
        ),
        (
            ["a", "b"],
            "labels",
            ["a.png", "edge"],
            ["--probabilities"],
            "a.png would be both the label map of a.png and the folder of class 'a.png'",
        ),
    ],
    ids=["prob-and-mask", "file-and-folder"],
)
def test_two_outputs_at_one_path_are_refused_before_writing_naming_both(
    two_classes, tmp_path, capsys, images, mask_type, classes, extra, message
):
    for index, name in enumerate(images):
        write_png_file(random_image(32, 32, seed=index), tmp_path / "images" / f"{name}.png")
    checkpoint = crafted(two_classes, tmp_path / "crafted.pt", classes=classes, mask_type=mask_type)
    out = tmp_path / "out"
    assert predict_cli(checkpoint, tmp_path / "images", out, *extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


@pytest.mark.parametrize("classes", [["cell"], ["cell", "edge", "rim"]], ids=["fewer", "more"])
def test_as_many_class_names_as_the_model_predicts_maps(two_classes, tmp_path, capsys, classes):
    images = tmp_path / "images"
    write_png_file(random_image(32, 32), images / "a.png")
    checkpoint = crafted(two_classes, tmp_path / "crafted.pt", classes=classes)
    assert predict_cli(checkpoint, images, tmp_path / "out") == 2
    err = capsys.readouterr().err
    names = ", ".join(classes)
    assert err.count("\n") == 1
    assert (
        f"records {len(classes)} class name{'s' * (len(classes) > 1)} ({names}) for a model that predicts 2 maps" in err
    )
    assert not (tmp_path / "out").exists()


def hidden_temporary_files(folder):
    return sorted(path.name for path in folder.rglob(".*.tmp"))


@pytest.fixture
def sigterm_fails_the_test():
    """SIGTERM fails the test instead of ending pytest: the command under test must handle it."""

    def fail(signum, frame):
        raise AssertionError("SIGTERM reached the test's own handler: the command did not handle it")

    previous = signal.signal(signal.SIGTERM, fail)
    yield
    signal.signal(signal.SIGTERM, previous)


def kill_while(process, condition):
    """SIGKILL `process` at a moment `condition` holds: it is stopped (SIGSTOP) whenever `condition`
    is seen to hold, and killed if it still holds while stopped, else let go on."""
    while process.poll_until(condition):
        os.kill(process.process.pid, signal.SIGSTOP)
        if condition():
            assert process.stop(signal.SIGKILL) == -signal.SIGKILL
            return
        os.kill(process.process.pid, signal.SIGCONT)
    raise AssertionError(f"{condition} never held while it ran: {process.stderr}")


def test_a_stopped_predict_marks_its_folder_partial_until_one_with_overwrite_completes(
    two_classes, tmp_path, capsys, mocker, sigterm_fails_the_test
):
    images = tmp_path / "images"
    for index in range(4):
        write_png_file(random_image(32, 32, seed=index), images / f"{index}.png")
    out = tmp_path / "out"
    import trainer_datasets

    writes = []
    real_write = trainer_datasets.write_png_file

    def write_then_stop(tensor, path):  # SIGTERM arrives once the third output's temporary file is written
        writes.append(path)
        real_write(tensor, path)
        if len(writes) == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    mocker.patch("recipes.prediction.write_png_file", side_effect=write_then_stop)
    assert predict_cli(two_classes, images, out) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "predict stopped by SIGTERM: the files in" in err and f"{out / 'PREDICT_INCOMPLETE.txt'} marks" in err
    assert "stopped before the end" in (out / "PREDICT_INCOMPLETE.txt").read_text()
    assert sorted(p.name for p in (out / "cell").iterdir()) == ["0.png", "0_prob.png"]  # the two renamed
    assert writes[2].parent == out / "edge" and hidden_temporary_files(out) == []  # the third one's is gone
    mocker.stopall()

    assert predict_cli(two_classes, images, out) == 2  # a partial folder is not taken for a finished one
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds PREDICT_INCOMPLETE.txt: a predict into it stopped before the end" in err
    assert predict_cli(two_classes, images, out, "--overwrite") == 0
    assert not (out / "PREDICT_INCOMPLETE.txt").exists()
    assert sorted(p.name for p in (out / "edge").iterdir()) == sorted(
        f"{index}{kind}.png" for index in range(4) for kind in ("", "_prob")
    )


def test_a_killed_predict_leaves_its_mark_and_the_next_one_cleans_up(two_classes, tmp_path, capsys):
    from tests.processes import RecipeProcess

    images = tmp_path / "images"
    for index in range(2):
        write_png_file(random_image(384, 384, seed=index), images / f"{index}.png")
    out = tmp_path / "out"
    process = RecipeProcess(
        ["predict", "--checkpoint", str(two_classes), "--images", str(images), "--out", str(out)], timeout=120
    )
    kill_while(process, lambda: any(out.rglob(".*.png.*.tmp")))  # killed while writing an output
    assert (out / "PREDICT_INCOMPLETE.txt").is_file() and any(out.rglob(".*.png.*.tmp"))
    assert predict_cli(two_classes, images, out) == 2
    assert "holds PREDICT_INCOMPLETE.txt" in capsys.readouterr().err
    assert predict_cli(two_classes, images, out, "--overwrite") == 0
    assert not (out / "PREDICT_INCOMPLETE.txt").exists() and hidden_temporary_files(out) == []
    assert sorted(p.name for p in (out / "cell").iterdir()) == sorted(
        f"{index}{kind}.png" for index in range(2) for kind in ("", "_prob")
    )


@pytest.fixture(scope="module")
def large_checkpoint(resized_run, tmp_path_factory):
    """The resized run's last.pt with 128 MB more in its data: an export that takes long enough to be killed."""
    path = tmp_path_factory.mktemp("large") / "last.pt"
    return crafted(resized_run, path, padding=torch.zeros(32 * 2**20))


def test_a_killed_export_leaves_a_temporary_file_the_next_export_removes(large_checkpoint, tmp_path, capsys):
    from tests.processes import RecipeProcess

    out = tmp_path / "model.pt"
    process = RecipeProcess(["export", "--checkpoint", str(large_checkpoint), "--out", str(out)], timeout=120)
    kill_while(process, lambda: hidden_temporary_files(tmp_path) != [])
    left = tmp_path / f".model.pt.{process.process.pid}.tmp"
    assert hidden_temporary_files(tmp_path) == [left.name] and not out.exists()
    running = tmp_path / f".model.pt.{os.getppid()}.tmp"  # of a process that runs: perhaps writing it now
    running.write_bytes(b"")
    assert run(["export", "--checkpoint", str(large_checkpoint), "--out", str(out)]) == 0
    assert f"removed {left}, the temporary file of an export that was killed" in capsys.readouterr().out
    assert hidden_temporary_files(tmp_path) == [running.name] and load_checkpoint(out)["data"]["padding"].numel()


def test_a_stopped_export_removes_its_temporary_file(resized_run, tmp_path, capsys, mocker, sigterm_fails_the_test):
    out = tmp_path / "model.pt"
    real_save = torch.save

    def save_then_stop(obj, file):  # SIGTERM arrives while the file is written
        os.kill(os.getpid(), signal.SIGTERM)
        real_save(obj, file)

    mocker.patch("torch.save", side_effect=save_then_stop)
    assert run(["export", "--checkpoint", str(resized_run), "--out", str(out)]) == 128 + signal.SIGTERM
    assert "export stopped by SIGTERM: nothing written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_resuming_from_a_weights_only_last_pt_is_one_line_before_training(resized_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert run(["export", "--checkpoint", str(resized_run), "--out", str(run_dir / "last.pt")]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    assert run(["--resume", str(run_dir), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{str(run_dir / 'last.pt')!r} holds a weights-only checkpoint" in err
    assert "resume from a last.pt that training wrote; nothing was changed" in err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before  # nothing trained, nothing written
