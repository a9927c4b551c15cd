"""Segmentation prediction: predict a folder of checked images at the scale the model learned
(large ones in blended tiles, same-sized ones batched) and write a probability map and a mask per
image and class, or for label maps one label map per image (and each class's probability map on
request).

Each file is written whole (a temporary file renamed over it), and
`recipes.prediction_files.INCOMPLETE_FILE` in the output folder marks a predict that has not
finished: written before the first output, removed after the last. What is read and written is
checked first, in `recipes.prediction_files`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from models.blocks import SIDE_MULTIPLE, nearest_multiple
from models.predict import (
    DEFAULT_OVERLAP,
    DEFAULT_TILE,
    count_windows,
    default_overlap,
    predict_batch,
    restore_size,
    to_model_input,
)
from recipes.errors import UsageError
from recipes.option_types import non_negative_int, positive_int
from recipes.prediction_files import INCOMPLETE_FILE, READ_ERRORS, ImageFile, output_paths
from trainer.atomic import atomic_path, atomic_write_text
from trainer.callbacks.palette import png_palette
from trainer.native import native_bf16
from trainer_datasets import read_image_rgb, write_label_map, write_png_file

__all__ = ["inference_precision", "predict_folder", "write_label_prediction", "write_prediction"]


def add_prediction_options(parser: argparse.ArgumentParser) -> None:
    """Add the scale (``--scale``, ``--image-size``) and tiling (``--tile``, ``--overlap``) options."""
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument(
        "--scale",
        choices=["trained", "native"],
        default="trained",
        help="trained: the scale the checkpoint was trained at (each image at its own resolution "
        "if the run had no --image-size, else resized to its --image-size square, as "
        "training resized); native: each image at its own resolution (default: %(default)s)",
    )
    scale.add_argument(
        "--image-size",
        type=positive_int,
        metavar="N",
        help="resize every image to N x N (bilinear, antialiased) instead",
    )
    parser.add_argument(
        "--tile",
        type=positive_int,
        default=DEFAULT_TILE,
        metavar="N",
        help="largest side the network sees at once, a multiple of 16: larger images are "
        "predicted in overlapping N x N tiles blended without seams, which bounds memory "
        "(a 512 tile: under 1 GB for NestedUNet on the CPU) (default: %(default)s)",
    )
    parser.add_argument(
        "--overlap",
        type=non_negative_int,
        metavar="PX",
        help="least overlap of neighbouring tiles in pixels, below --tile: of each overlap, the "
        "quarter next to a tile's edge is dropped and the next quarter fades in (default: "
        f"{DEFAULT_OVERLAP}, beyond the U-Nets' 110-pixel receptive-field radius, or half a "
        f"--tile below {2 * DEFAULT_OVERLAP})",
    )


def check_prediction_options(args: argparse.Namespace) -> None:
    """Option checks that need no files: ``--tile`` a multiple of 16, ``--overlap`` below it (set
    to `default_overlap` of the tile when not given)."""
    if args.tile % SIDE_MULTIPLE:
        raise UsageError(f"--tile {args.tile} is not a multiple of {SIDE_MULTIPLE}; try {nearest_multiple(args.tile)}")
    if args.overlap is None:
        args.overlap = default_overlap(args.tile)
    if args.overlap >= args.tile:
        raise UsageError(f"--overlap {args.overlap} must be smaller than --tile {args.tile}")


def inference_precision(config: dict[str, Any], device: torch.device) -> tuple[str, str]:
    """``(precision, reason)`` of the forward passes: the run's training precision where this
    device computes it natively, else float32.

    bf16 autocast runs only for runs trained in bf16 on a device with native bf16 (elsewhere it
    would be emulated, many times slower); float16 autocast only for runs trained with it, on
    CUDA; all others predict in float32.

    Args:
        config: the run's configuration as its checkpoint records it (``precision``).
        device: where the model predicts.
    """
    trained = config.get("precision", "32")
    if trained == "bf16":
        if native_bf16(device):
            return "bf16", "bf16 autocast, as the run trained"
        return "32", f"float32: the run trained in bf16, which this {device.type.upper()} does not compute natively"
    if trained == "16-mixed":
        if device.type == "cuda":
            return "16-mixed", "float16 autocast, as the run trained"
        return "32", "float32: the run trained with float16 autocast, which pays only on a GPU"
    return "32", "float32, as the run trained"


def model_side(file: ImageFile, image_size: int | None) -> tuple[int, int]:
    """The (height, width) the model sees `file` at."""
    return (image_size, image_size) if image_size is not None else (file.height, file.width)


def batches(files: list[ImageFile], image_size: int | None, tile: int) -> list[list[ImageFile]]:
    """`files` in batches of one size at the model's scale, each of at most ``tile * tile``
    pixels (at least one image), in the order of first appearance of each size."""
    groups: dict[tuple[int, int], list[ImageFile]] = {}
    for file in files:
        groups.setdefault(model_side(file, image_size), []).append(file)
    result: list[list[ImageFile]] = []
    for (height, width), group in groups.items():
        padded = (height + -height % SIDE_MULTIPLE) * (width + -width % SIDE_MULTIPLE)
        size = max(1, tile * tile // padded)
        result.extend(group[i : i + size] for i in range(0, len(group), size))
    return result


def predict_folder(
    model: nn.Module,
    files: list[ImageFile],
    out: Path,
    classes: list[str],
    image_size: int | None,
    tile: int = DEFAULT_TILE,
    overlap: int | None = None,
    precision: str = "32",
    channels_last: bool = False,
    threshold: float = 0.5,
    labels: bool = False,
    probabilities: bool = False,
) -> None:
    """Predict `files` and write each one's probability maps and masks into `out` (see
    `write_prediction`), or for a model trained on label maps each one's label map (see
    `write_label_prediction`), with a tqdm bar counting tiles. A failed write (a full disk) is a
    `UsageError` naming the file and how many images' outputs are complete. Check the outputs
    with `check_outputs` first.

    `INCOMPLETE_FILE` is written into `out` before the first output and removed after the last:
    a predict stopped in between (killed, a full disk) leaves it, saying that the folder's
    outputs are partial (each file in it is whole). A stop before any output was written
    removes it again. A model that predicts another number of maps than `classes` names is a
    `UsageError` before anything is written.

    Args:
        model: the trained network, on its device (channels-last already if `channels_last`).
        files: the images, as `check_images` returns them.
        out: the output folder (created if missing).
        classes: the class names, one per model output channel.
        image_size: None predicts each image at its own resolution, N resizes it to N x N.
        tile: largest side of a forward pass (see `models.predict.predict_batch`).
        overlap: least overlap of neighbouring tiles.
        precision: ``"32"``, ``"bf16"`` or ``"16-mixed"`` autocast.
        channels_last: feed channels-last inputs.
        threshold: probability above which a pixel is foreground in the mask.
        labels: the model predicts exclusive classes (trained on label maps): softmax, and a
            label map of the most probable class per pixel.
        probabilities: with `labels`, also write each class's probability map.
    """
    total = sum(count_windows(*model_side(file, image_size), tile, overlap) for file in files)
    marker = _mark_incomplete(out, files)
    done, writing = 0, False
    try:
        with tqdm(total=total, unit="tile", desc=f"{len(files)} image{'' if len(files) == 1 else 's'}") as bar:
            for batch in batches(files, image_size, tile):
                predicted = _predict_maps(
                    model, batch, image_size, classes, tile, overlap, precision, channels_last, labels, bar.update
                )
                for file, probability in zip(batch, predicted):
                    writing = True
                    _write_outputs(
                        restore_size(probability, (file.height, file.width)),
                        out,
                        file,
                        classes,
                        done,
                        threshold=threshold,
                        labels=labels,
                        probabilities=probabilities,
                    )
                    done += 1
    except BaseException:
        if not writing:  # nothing of this predict is in `out`: the folder is as it was
            with contextlib.suppress(OSError):
                marker.unlink()
        raise
    marker.unlink()


def _predict_maps(
    model: nn.Module,
    batch: list[ImageFile],
    image_size: int | None,
    classes: list[str],
    tile: int,
    overlap: int | None,
    precision: str,
    channels_last: bool,
    labels: bool,
    progress: Callable[[int], None],
) -> torch.Tensor:
    """The probability maps of the images of `batch`, read again (a file changed since it was
    checked is a `UsageError`); a model that predicts other than a map per class is a `UsageError`."""
    images = []
    for file in batch:
        try:
            images.append(to_model_input(read_image_rgb(file.path), image_size))
        except READ_ERRORS as exc:  # changed since it was checked
            raise UsageError(str(exc)) from None
    predicted = predict_batch(
        model,
        torch.stack(images),
        tile=tile,
        overlap=overlap,
        precision=precision,
        channels_last=channels_last,
        progress=progress,
        activation="softmax" if labels else "sigmoid",
    )
    if predicted.shape[1] != len(classes):
        raise UsageError(
            f"the model predicts {predicted.shape[1]} maps per image, but {len(classes)} class names "
            f"are given ({', '.join(classes)}); nothing written"
        )
    return predicted


def _write_outputs(
    probability: torch.Tensor,
    out: Path,
    file: ImageFile,
    classes: list[str],
    done: int,
    *,
    threshold: float,
    labels: bool,
    probabilities: bool,
) -> None:
    """Write the outputs of one image whose maps `predict_folder` predicted, after `done` others;
    a failed write (a full disk) is a `UsageError` saying what is complete."""
    try:
        if labels:
            write_label_prediction(probability, out, file.id, classes, probabilities)
        else:
            write_prediction(probability, out, file.id, classes, threshold)
    except OSError as exc:  # a full disk or an unwritable folder
        raise UsageError(
            f"cannot write {exc.filename}: {exc.strerror or exc}; prediction stopped: the "
            f"outputs of the {done} image{'' if done == 1 else 's'} before it in {out} are "
            f"complete, no partial file was left, and {out / INCOMPLETE_FILE} marks the folder as partial"
        ) from None


def _mark_incomplete(out: Path, files: list[ImageFile]) -> Path:
    """Write `INCOMPLETE_FILE` into `out` for a predict of `files` and return it; a failed write is a `UsageError`."""
    marker = out / INCOMPLETE_FILE
    try:
        atomic_write_text(_incomplete_note(files), marker)
    except OSError as exc:
        raise UsageError(f"cannot write {exc.filename}: {exc.strerror or exc}; nothing written") from None
    return marker


def _incomplete_note(files: list[ImageFile]) -> str:
    """The text of `INCOMPLETE_FILE` for a predict of `files`."""
    folder = files[0].path.parent if files else "?"
    return (
        f"A predict started at {time.strftime('%Y-%m-%d %H:%M:%S')} (pid {os.getpid()} on {socket.gethostname()}) "
        f"to write the outputs of {len(files)} images of {folder} into this folder.\n"
        "It removes this file once the last output is written. If the file is still here, that predict stopped "
        "before the end: every file here is whole, but some images have no outputs yet.\n"
        "Run the same predict again with --overwrite to complete the folder.\n"
    )


def write_prediction(
    probabilities: torch.Tensor, out: Path, image_id: str, classes: list[str], threshold: float
) -> None:
    """Write one image's probability maps (0-255) and masks (0/255) as grey PNGs, at the paths
    of `output_paths`.

    Each file is written whole or not at all (a temporary file renamed over it): a failed write
    (a full disk) removes its temporary file and raises an `OSError` naming the output.

    Args:
        probabilities: float (K, H, W) in [0, 1], K = ``len(classes)``.
        out: the output folder.
        image_id: the image's file name without extension.
        classes: the class names.
        threshold: probability above which a pixel is foreground.
    """
    probabilities = probabilities.cpu()
    paths = iter(output_paths(out, image_id, classes))
    for index in range(len(classes)):
        channel = probabilities[index : index + 1]
        prob = channel.mul(255).round_().to(torch.uint8)
        mask = (channel > threshold).to(torch.uint8) * 255
        _write_png_atomically(prob, next(paths))
        _write_png_atomically(mask, next(paths))


def write_label_prediction(
    probabilities: torch.Tensor, out: Path, image_id: str, classes: list[str], with_probabilities: bool = False
) -> None:
    """Write one image's label map, the most probable class of each pixel, as a palette PNG
    (index = class, in the class colours of the image grids and prediction figures,
    `trainer.callbacks.palette.png_palette`; `trainer_datasets.read_label_map` reads it back), and
    with `with_probabilities` each class's probability map (0-255 grey), at the paths of
    `output_paths`. Each file is written whole or not at all, as in `write_prediction`.

    Args:
        probabilities: float (K, H, W) in [0, 1] summing to 1 over K (softmax), K = ``len(classes)``.
        out: the output folder.
        image_id: the image's file name without extension.
        classes: the class names.
        with_probabilities: also write the probability maps.
    """
    probabilities = probabilities.cpu()
    paths = output_paths(out, image_id, classes, labels=True, probabilities=with_probabilities)
    _write_png_atomically(probabilities.argmax(0), paths[0], label_map=True)
    for index, path in enumerate(paths[1:]):
        _write_png_atomically(probabilities[index : index + 1].mul(255).round_().to(torch.uint8), path)


def _write_png_atomically(image: torch.Tensor, path: Path, label_map: bool = False) -> None:
    with atomic_path(path) as tmp:
        if label_map:
            write_label_map(image, tmp, palette=png_palette())
        else:
            write_png_file(image, tmp)
