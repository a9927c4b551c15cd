"""The segmentation recipe's ``predict`` command: check a folder of images, predict them at the
scale the model learned (large ones in blended tiles, same-sized ones batched) and write a
probability map and a mask per image and class, or for label maps one label map per image (and
each class's probability map on request).

Writes stay inside ``--out``: class names are checked (`check_class_names`), and every planned
output is checked before the first write (`check_outputs`): inside ``--out`` once symbolic links
are followed, outside training data folders, one output per path. Each file is written whole
(a temporary file renamed over it), and `INCOMPLETE_FILE` in ``--out`` marks a folder whose
predict has not finished: written before the first output, removed after the last.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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
from recipes.common import UsageError, non_negative_int, positive_int
from trainer.atomic import atomic_write_text, temporary_path
from trainer.native import native_bf16
from trainer_datasets import (
    DatasetError,
    is_image_file,
    is_system_file,
    not_regular,
    read_image_rgb,
    write_label_map,
    write_png_file,
)
from trainer_datasets.segmentation_folder import class_name_problem

#: Errors the image reader raises for a file it cannot use.
READ_ERRORS = (DatasetError, OSError, RuntimeError, ValueError)
#: The file in ``--out`` that marks a predict that has not finished: its outputs are partial.
INCOMPLETE_FILE = "PREDICT_INCOMPLETE.txt"
#: The temporary files of this module's writes (`trainer.atomic.temporary_path` of an output or the mark).
_TEMPORARY = re.compile(rf"\..+\.png\.\d+\.tmp|\.{re.escape(INCOMPLETE_FILE)}\.\d+\.tmp")


@dataclass(frozen=True)
class ImageFile:
    """An image to predict: its file and its own size."""

    path: Path
    height: int
    width: int

    @property
    def id(self) -> str:
        """The file name without its extension: the outputs are named after it."""
        return self.path.stem


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


def check_images(folder: str) -> list[ImageFile]:
    """Decode every image file in `folder` (sorted by name) and return their sizes. Hidden and
    system files (``.DS_Store``, ``Thumbs.db``) are left out, as training leaves them out, and
    so are folders and files with other extensions.

    Nothing is kept in memory but the sizes. Every problem goes into one `UsageError`: a
    missing folder, entries with an image extension that are no regular files (FIFOs, dangling or
    looping links: named, never opened), no images, each file that cannot be decoded (named, with the reason) and
    ids (file names without extension) that two files share, since the outputs are named by id.
    """
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"--images {folder!r}: no such folder")
    entries = sorted(p for p in root.iterdir() if is_image_file(p) and not is_system_file(p))
    kinds = {p: not_regular(p) for p in entries}
    irregular = [f"{p.name} is {kind}" for p, kind in kinds.items() if kind not in (None, "a folder")]
    if irregular:  # never opened: reading a FIFO would wait forever
        raise UsageError(
            f"--images {folder!r} holds entries that are not image files, nothing written: " + "; ".join(irregular)
        )
    paths = [p for p, kind in kinds.items() if kind is None]
    if not paths:
        raise UsageError(f"--images {folder!r} holds no .png, .jpg or .tif images")
    files: list[ImageFile] = []
    problems: list[str] = []
    seen: dict[str, Path] = {}
    for path in paths:
        if path.stem in seen:
            problems.append(f"{seen[path.stem].name} and {path.name} share the id {path.stem!r} that names the outputs")
            continue
        seen[path.stem] = path
        try:
            image = read_image_rgb(path)
        except READ_ERRORS as exc:
            problems.append(str(exc))
            continue
        files.append(ImageFile(path, image.shape[-2], image.shape[-1]))
    if problems:
        raise UsageError(
            f"{len(problems)} of the {len(paths)} images in {folder} cannot be predicted, nothing "
            f"written: " + "; ".join(problems)
        )
    return files


def check_class_names(classes: object, source: str | os.PathLike) -> list[str]:
    """`classes`, the class names a checkpoint records, when every one can name outputs: a list of
    distinct strings that `trainer_datasets.segmentation_folder.class_name_problem` accepts (no
    ``.``, ``..``, path separator or control character). Otherwise a one-line `UsageError`
    naming `source` and the first name at fault: a name like ``../x`` would send outputs out of
    ``--out``.

    Args:
        classes: the ``classes`` of the checkpoint's ``data`` (or ``config``).
        source: the checkpoint, for the message.
    """
    if not isinstance(classes, (list, tuple)):
        raise UsageError(
            f"{source} records its class names as a {type(classes).__name__}, not a list of names; nothing written"
        )
    for index, name in enumerate(classes):
        problem = class_name_problem(name)
        if problem is None and name in classes[:index]:
            problem = f"names class {classes.index(name)} as well"
        if problem is not None:
            raise UsageError(
                f"{source} records the class name {name!r} (class {index}), which {problem}; outputs are "
                "named after the classes, so it is refused: nothing written"
            )
    return list(classes)


def inference_precision(config: dict[str, Any], device: torch.device) -> tuple[str, str]:
    """``(precision, reason)`` of the forward passes: the run's training precision where this
    device computes it natively, else float32.

    bf16 autocast runs only for runs trained in bf16 on a device with native bf16 (elsewhere it
    would be emulated, many times slower); float16 autocast only for runs trained with it, on
    CUDA; all others predict in float32.
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
    work = batches(files, image_size, tile)
    total = sum(count_windows(*model_side(file, image_size), tile, overlap) for file in files)
    marker = out / INCOMPLETE_FILE
    try:
        atomic_write_text(_incomplete_note(files), marker)
    except OSError as exc:
        raise UsageError(f"cannot write {exc.filename}: {exc.strerror or exc}; nothing written") from None
    done, writing = 0, False
    try:
        with tqdm(total=total, unit="tile", desc=f"{len(files)} image{'' if len(files) == 1 else 's'}") as bar:
            for batch in work:
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
                    progress=bar.update,
                    activation="softmax" if labels else "sigmoid",
                )
                if predicted.shape[1] != len(classes):
                    raise UsageError(
                        f"the model predicts {predicted.shape[1]} maps per image, but {len(classes)} class names "
                        f"are given ({', '.join(classes)}); nothing written"
                    )
                for file, probability in zip(batch, predicted):
                    probability = restore_size(probability, (file.height, file.width))
                    writing = True
                    try:
                        if labels:
                            write_label_prediction(probability, out, file.id, classes, probabilities)
                        else:
                            write_prediction(probability, out, file.id, classes, threshold)
                    except OSError as exc:  # a full disk or an unwritable folder
                        raise UsageError(
                            f"cannot write {exc.filename}: {exc.strerror or exc}; prediction stopped: the "
                            f"outputs of the {done} image{'' if done == 1 else 's'} before it in {out} are "
                            f"complete, no partial file was left, and {marker} marks the folder as partial"
                        ) from None
                    done += 1
    except BaseException:
        if not writing:  # nothing of this predict is in `out`: the folder is as it was
            with contextlib.suppress(OSError):
                marker.unlink()
        raise
    marker.unlink()


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


def output_paths(
    out: Path, image_id: str, classes: list[str], labels: bool = False, probabilities: bool = False
) -> list[Path]:
    """The files `write_prediction` writes for one image, probability map then mask per class.

    One class: ``<out>/<id>_prob.png`` and ``<out>/<id>_mask.png``. Several: the training layout,
    ``<out>/<class>/<id>_prob.png`` and ``<out>/<class>/<id>.png``. With `labels`, the files of
    `write_label_prediction`: the label map ``<out>/<id>.png``, then with `probabilities`
    ``<out>/<class>/<id>_prob.png`` per class.
    """
    return [path for path, _ in _outputs(out, image_id, classes, labels, probabilities)]


def _outputs(
    out: Path, image_id: str, classes: Sequence[str], labels: bool, probabilities: bool
) -> list[tuple[Path, str]]:
    """`output_paths` with what each file is, for messages."""
    if labels:
        maps = [(out / name / f"{image_id}_prob.png", f"probability map of class {name!r}") for name in classes]
        return [(out / f"{image_id}.png", "label map"), *(maps if probabilities else [])]
    if len(classes) == 1:
        return [(out / f"{image_id}_prob.png", "probability map"), (out / f"{image_id}_mask.png", "mask")]
    return [
        pair
        for name in classes
        for pair in (
            (out / name / f"{image_id}_prob.png", f"probability map of class {name!r}"),
            (out / name / f"{image_id}.png", f"mask of class {name!r}"),
        )
    ]


def check_outputs(
    out: Path,
    files: list[ImageFile],
    classes: list[str],
    overwrite: bool,
    labels: bool = False,
    probabilities: bool = False,
) -> None:
    """Refuse, before anything is written, outputs that would go astray, be lost or replace files;
    each case is a one-line `UsageError` (saying that nothing was written):

    - two outputs at one path, e.g. with several classes ``cell.png``'s probability map and
      ``cell_prob.png``'s mask (both ``<class>/cell_prob.png``), or an output file where the
      folder of a class goes: both images are named;
    - an output whose folder lies outside `out` once symbolic links are followed (a class folder
      that links elsewhere), or in a training data folder (one with ``images/`` and ``masks/``);
    - an output that is a folder;
    - unless `overwrite`: `INCOMPLETE_FILE` in `out` (a predict into it that did not finish),
      and any output that exists already (the first is named, and how many there are).

    Args:
        out: the output folder (it may not exist yet).
        files: the images, as `check_images` returns them.
        classes: the class names (checked by `check_class_names`).
        overwrite: existing outputs may be replaced.
        labels: the outputs of `write_label_prediction` instead of `write_prediction`.
        probabilities: with `labels`, the probability maps too.
    """
    planned: dict[Path, tuple[ImageFile, str]] = {}
    for file in files:
        for path, role in _outputs(out, file.id, classes, labels, probabilities):
            if path in planned:
                other, other_role = planned[path]
                both = (
                    f"{file.path.name} would write it twice (its {other_role} and its {role})"
                    if other is file
                    else f"{other.path.name} and {file.path.name} would both write it (the {other_role} of "
                    f"{other.path.name}, the {role} of {file.path.name})"
                )
                raise UsageError(
                    f"--out {str(out)!r}: {path} is planned twice: {both}; nothing written: rename one of the "
                    "images or predict them into separate folders"
                )
            planned[path] = (file, role)
    folders = {path.parent for path in planned}
    for path, (file, role) in planned.items():
        if path in folders:
            raise UsageError(
                f"--out {str(out)!r}: {path} would be both the {role} of {file.path.name} and the folder of class "
                f"{path.name!r}; nothing written: rename the image or predict it into another folder"
            )
    root = out.resolve()
    leads_to: dict[Path, Path] = {}
    for folder in sorted(folders):
        try:
            resolved = folder.resolve()
        except (OSError, RuntimeError) as exc:  # a symbolic link loop
            raise UsageError(f"--out {str(out)!r}: cannot follow {folder}: {exc}; nothing written") from None
        if not resolved.is_relative_to(root):
            raise UsageError(
                f"--out {str(out)!r}: the output folder {folder} leads to {resolved}, outside --out (a symbolic "
                "link); predict writes only inside --out: nothing written"
            )
        if resolved in leads_to:  # the outputs of two classes would land in one folder
            raise UsageError(
                f"--out {str(out)!r}: the output folders {leads_to[resolved]} and {folder} are one folder, "
                f"{resolved} (a symbolic link), where their outputs would replace each other; nothing written"
            )
        leads_to[resolved] = folder
        data = data_folder_above(resolved)
        if data is not None:
            raise UsageError(
                f"--out {str(out)!r}: the output folder {folder} lies in the training data folder {str(data)!r} "
                "(it holds images/ and masks/); nothing written: choose a folder outside it"
            )
    clashes = [path for path in planned if path.exists()]
    taken = [path for path in clashes if path.is_dir()]
    if taken:
        raise UsageError(f"--out {str(out)!r}: {taken[0]} is a folder where an output file goes; nothing written")
    if overwrite:
        return
    if (out / INCOMPLETE_FILE).exists():
        raise UsageError(
            f"--out {str(out)!r} holds {INCOMPLETE_FILE}: a predict into it stopped before the end, so its outputs "
            "are partial; nothing written: run predict again with --overwrite to complete them, or choose another "
            "--out"
        )
    if clashes:
        more = f" and {len(clashes) - 1} more of the outputs" if len(clashes) > 1 else ""
        raise UsageError(
            f"--out {str(out)!r} already holds {clashes[0]}{more}; nothing written: pass --overwrite to "
            "replace them, or choose another --out"
        )


def remove_partial_files(out: Path, classes: Iterable[str]) -> list[Path]:
    """Delete the temporary files (``.NAME.png.PID.tmp``, and that of `INCOMPLETE_FILE`) that a
    predict killed while writing left in `out` and in its class folders, and return them. Call it
    only while holding `out`'s lock (no other predict writes there).

    Args:
        out: the output folder.
        classes: the class names (their folders in `out` are looked into too).
    """
    removed = []
    for folder in (out, *(out / name for name in classes)):
        if folder.is_dir() and not folder.is_symlink():
            for path in folder.iterdir():
                if _TEMPORARY.fullmatch(path.name) and path.is_file() and not path.is_symlink():
                    path.unlink(missing_ok=True)
                    removed.append(path)
    return removed


def data_folder_above(path: Path) -> Path | None:
    """The training data folder (one holding both ``images/`` and ``masks/``) that `path` is, or
    lies in, else None."""
    for folder in (path, *path.parents):
        if (folder / "images").is_dir() and (folder / "masks").is_dir():
            return folder
    return None


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
    (index = class, Pascal VOC colours; `trainer_datasets.read_label_map` reads it back), and
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
    tmp = temporary_path(path)
    try:
        if label_map:
            write_label_map(image, tmp)
        else:
            write_png_file(image, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
