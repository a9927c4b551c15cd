"""`SegmentationRecipe`: a `Recipe` whose runs segment images, with two commands beside training:
``predict`` (probability maps and masks, or label maps, for a folder of images) and ``export`` (a
weights-only copy of a checkpoint, for deployment).

A segmentation recipe subclasses it as it would `Recipe` and runs with
``sys.exit(run_cli(MyRecipe().main))``; then ``python my_recipe.py predict --checkpoint RUN/best.pt
--images DIR --out DIR`` and ``python my_recipe.py export --checkpoint RUN/best.pt --out model.pt``
read its runs' checkpoints (and those of any segmentation recipe whose model is one of the
project's, or one of `SegmentationRecipe.model_classes`).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from recipes.cli import RecipeArgumentParser, program
from recipes.common import ConfigT, PartsT, Recipe
from recipes.errors import UsageError
from recipes.interrupts import Stopped, stop_signals_raise
from recipes.option_types import device_option, fraction
from recipes.prediction import add_prediction_options, check_prediction_options, inference_precision, predict_folder
from recipes.prediction_files import (
    INCOMPLETE_FILE,
    ImageFile,
    check_images,
    check_outputs,
    data_folder_above,
    remove_partial_files,
)
from recipes.run_dir import lock_run_dir
from recipes.segmentation_model import TrainedSegmentation, load_trained_model
from trainer.trained_model import export_model

__all__ = ["SegmentationRecipe", "remove_killed_exports"]

PREDICT_DESCRIPTION = (
    "Write a probability map and a binary mask PNG per image, at the image's own size: "
    "<out>/<id>_prob.png and <out>/<id>_mask.png, or with several classes "
    "<out>/<class>/<id>_prob.png and <out>/<class>/<id>.png; for a run trained on label maps, a "
    "label map <out>/<id>.png (palette PNG, index = class) and, with --probabilities, "
    "<out>/<class>/<id>_prob.png. Images of any size, grey, RGB or "
    "RGBA, 8 or 16 bits, are predicted at the scale the checkpoint was trained at (--scale), "
    "large ones in blended tiles (--tile), same-sized ones in batches. Every image is decoded "
    "first: unreadable files are all named in one error and nothing is written. Existing outputs "
    "are never replaced without --overwrite, --out may not lie in a training data folder (one with "
    "images/ and masks/), and one predict at a time writes into a folder. Class names that are not "
    "a single folder name (.., a/b, a control character) are refused, and every output must lie "
    f"inside --out, symbolic links followed, before anything is written. {INCOMPLETE_FILE} in --out "
    "says that a predict there has not finished (kept if it was stopped: the next one then needs "
    "--overwrite)."
)


class SegmentationRecipe(Recipe[ConfigT, PartsT]):
    """A `Recipe` whose runs segment images: `main` runs ``predict`` and ``export`` besides training.

    ``predict`` reads a checkpoint through `load_trained_model` (its model, class names, image
    size and ``mask_type``, see `recipes.common.RecipeParts.data`); ``export`` writes its weights
    and description only. A subclass declares what is its own, as for `Recipe`; `model_classes`
    and `rebuild_model` are only for models outside the project's and for old checkpoints.
    """

    #: Model classes ``predict`` may rebuild besides PyTorch's layers and the project's models.
    model_classes: ClassVar[tuple[type[nn.Module], ...]] = ()

    def rebuild_model(
        self, state: dict[str, Any], config: dict[str, Any], checkpoint: str | os.PathLike
    ) -> nn.Module | None:
        """The network of a checkpoint without a model description (the recipe's files from
        before checkpoints recorded it), its weights loaded, or None (the default): such a file
        is then refused. It may complete `config`, the run's options as a dict, in place.

        Args:
            state: the loaded checkpoint.
            config: its ``"config"``, the run's options as saved (a dict).
            checkpoint: the file, for messages.
        """
        return None

    def load_trained_model(
        self, checkpoint: str | os.PathLike, device: str | torch.device = "cpu"
    ) -> TrainedSegmentation:
        """`recipes.segmentation_model.load_trained_model` with this recipe's `model_classes`
        and `rebuild_model`.

        Args:
            checkpoint: ``RUN/best.pt`` or ``RUN/last.pt`` of a segmentation run, or an export.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a `torch.device`.
        """
        return load_trained_model(checkpoint, device, self.model_classes, self.rebuild_model)

    def main(self, argv: list[str] | None = None) -> int:
        """``[predict|export] ...``: predict, export, or else train (`Recipe.train`); the exit code.

        Args:
            argv: the command-line arguments (default: ``sys.argv[1:]``).
        """
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv and argv[0] == "predict":
            return self.predict(argv[1:])
        if argv and argv[0] == "export":
            return export(argv[1:], f"{program(type(self).__module__)} export")
        return self.train(argv)

    def build_predict_parser(self) -> argparse.ArgumentParser:
        """The ``predict`` command's options."""
        parser = RecipeArgumentParser(prog=f"{program(type(self).__module__)} predict", description=PREDICT_DESCRIPTION)
        parser.add_argument(
            "--checkpoint",
            required=True,
            help="a checkpoint of a segmentation run (RUN/best.pt or last.pt) of this recipe or any "
            "other whose model is one of the project's (UNet, NestedUNet)",
        )
        parser.add_argument("--images", required=True, help="folder of .png/.jpg/.tif images")
        parser.add_argument(
            "--out",
            required=True,
            help="folder for the outputs: <id>_prob.png and <id>_mask.png (one class), <class>/<id>_prob.png "
            "and <class>/<id>.png (several classes), or <id>.png (label maps; with --probabilities also "
            "<class>/<id>_prob.png)",
        )
        parser.add_argument(
            "--overwrite",
            action="store_true",
            help="replace output files that --out holds already (default: refuse, naming the first, "
            "before anything is written)",
        )
        _add_output_options(parser)
        return parser

    def predict(self, argv: list[str]) -> int:
        """Write probability maps and masks (or label maps) for a folder of images; the exit code.

        Args:
            argv: the ``predict`` command's arguments (see `build_predict_parser`).
        """
        args = self.build_predict_parser().parse_args(argv)
        check_prediction_options(args)
        out = _check_out(args)
        trained = self.load_trained_model(args.checkpoint, args.device)
        files, classes = check_images(args.images), trained.classes
        labels = trained.mask_type == "labels"
        check_outputs(out, files, classes, args.overwrite, labels, args.probabilities)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create --out {args.out!r}: {exc.strerror or exc}") from None
        with lock_run_dir(out, f"--out {args.out!r}"):
            check_outputs(out, files, classes, args.overwrite, labels, args.probabilities)  # again
            remove_partial_files(out, classes)  # left by a predict killed while writing
            _predict_locked(args, trained, files, out)
        maps = len(files) * len(classes)  # probability maps: one per image and class
        if labels:
            what = _counted(len(files), "label map")
            what += f" and {_counted(maps, 'probability map')}" if args.probabilities else ""
        else:
            what = f"{_counted(maps, 'probability map')} and {_counted(maps, 'mask')}"
        print(f"wrote {what} to {out}")
        return 0


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    """``--threshold``, ``--probabilities``, ``--device`` and those of `add_prediction_options`."""
    parser.add_argument(
        "--threshold",
        type=fraction,
        default=0.5,
        help="binary masks: probability of foreground (default: 0.5); label maps take the most probable class",
    )
    parser.add_argument(
        "--probabilities",
        action="store_true",
        help="label maps: also write each class's probability map, <out>/<class>/<id>_prob.png "
        "(binary masks always have theirs)",
    )
    parser.add_argument(
        "--device", type=device_option, default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)"
    )
    add_prediction_options(parser)


def _check_out(args: argparse.Namespace) -> Path:
    """``--out`` as a folder predict may write into: not a file, not the ``--images`` folder,
    not in a training data folder, writable; else a `UsageError`."""
    out = Path(args.out)
    if not args.out.strip():
        raise UsageError("--out '' names no folder")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out!r} is a file, not a folder")
    if out.resolve() == Path(args.images).resolve():
        raise UsageError("--out must not be the --images folder: its outputs would be read as images next time")
    data = data_folder_above(out.resolve())
    if data is not None:
        raise UsageError(
            f"--out {args.out!r} lies in the training data folder {str(data)!r} (it holds images/ and "
            "masks/): predictions there would mix with, or replace, its images and masks; choose a "
            "folder outside it"
        )
    if out.is_dir() and not os.access(out, os.W_OK):
        raise UsageError(f"--out {args.out!r} is not writable")
    return out


def _scale(args: argparse.Namespace, trained: int | None) -> tuple[int | None, str]:
    """The square side every image is resized to (None: each at its own size), and why; `trained`
    is the run's (None: each image at its own size)."""
    if args.image_size is not None:
        return args.image_size, f"every image resized to {args.image_size}x{args.image_size} (--image-size)"
    if args.scale == "native" or trained is None:
        scale = "each image at its own resolution"
        return None, scale + (" (--scale native)" if trained is not None else ", as the run trained")
    return trained, (
        f"every image resized to {trained}x{trained}, as the run trained "
        "(--scale native: each image at its own resolution)"
    )


def _predict_locked(args: argparse.Namespace, trained: TrainedSegmentation, files: list[ImageFile], out: Path) -> None:
    """Predict `files` into `out`, whose lock the caller holds: print the settings, then write; a
    stop signal ends the command with 128 + the signal and says what `out` holds."""
    image_size, scale = _scale(args, trained.image_size)
    precision, reason = inference_precision(trained.config, next(trained.model.parameters()).device)
    channels_last = trained.channels_last
    print(
        f"scale: {scale}; precision: {reason}{', channels-last' if channels_last else ''}; "
        f"tiles up to {args.tile}x{args.tile}, overlap {args.overlap}",
        flush=True,
    )
    try:
        with stop_signals_raise():
            predict_folder(
                trained.model,
                files,
                out,
                trained.classes,
                image_size,
                tile=args.tile,
                overlap=args.overlap,
                precision=precision,
                channels_last=channels_last,
                threshold=args.threshold,
                labels=trained.mask_type == "labels",
                probabilities=args.probabilities,
            )
    except Stopped as exc:
        partial = (out / INCOMPLETE_FILE).exists()
        said = (
            f"the files in {out} are whole, but some images have no outputs: {out / INCOMPLETE_FILE} "
            "marks the folder as partial until a predict with --overwrite completes it"
        )
        print(f"predict stopped by {exc.name}: {said if partial else 'nothing written'}", file=sys.stderr)
        raise SystemExit(128 + exc.signum) from None


def _counted(count: int, noun: str) -> str:
    """``1 mask``, ``2 masks``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def build_export_parser(prog: str) -> argparse.ArgumentParser:
    """The ``export`` command's options.

    Args:
        prog: the command, for the help (``python -m recipes.nested_unet export``).
    """
    parser = RecipeArgumentParser(
        prog=prog,
        description="Write the weights and the description of a checkpoint's model (class, constructor arguments, "
        "classes, image size, run options) without the optimizer and training state: a third of the "
        "size, for deployment. `predict` and trainer.load_model read it; it cannot resume a run.",
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint of a run (RUN/best.pt or last.pt)")
    parser.add_argument("--out", required=True, help="the file to write (e.g. model.pt); never replaced")
    return parser


def export(argv: list[str], prog: str) -> int:
    """Write a weights-only copy of a checkpoint; returns the exit code.

    The file is written whole or not at all, through a temporary file beside it
    (``.NAME.PID.tmp``) that every exit Python controls removes (an error, Ctrl-C, SIGTERM); one
    that a killed export (SIGKILL) left is removed by the next export to the same file.

    Args:
        argv: the ``export`` command's arguments (see `build_export_parser`).
        prog: the command, for the help.
    """
    args = build_export_parser(prog).parse_args(argv)
    out = Path(args.out)
    if out.exists() or out.is_symlink():
        raise UsageError(f"--out {args.out!r} exists already; choose another file (nothing written)")
    for path in remove_killed_exports(out):
        print(f"removed {path}, the temporary file of an export that was killed")
    try:
        with stop_signals_raise():
            export_model(args.checkpoint, out)
    except Stopped as exc:
        done = f"{out} was written" if out.exists() else "nothing written"
        print(f"export stopped by {exc.name}: {done}", file=sys.stderr)
        raise SystemExit(128 + exc.signum) from None
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def remove_killed_exports(out: Path) -> list[Path]:
    """Delete the temporary files (``.NAME.PID.tmp`` beside `out`) of exports to `out` whose
    process no longer runs (killed while writing), and return them; those of a running process
    are left alone.

    Args:
        out: the file an export writes.
    """
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(\d+)\.tmp")
    removed = []
    for path in out.parent.glob(".*.tmp"):
        match = pattern.fullmatch(path.name)
        if match and not _running(int(match[1])) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    """Whether a process `pid` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        pass
    return True
