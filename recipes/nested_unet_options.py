"""The command line of `recipes.nested_unet` and the configuration it makes: each option, the field
of `NestedUNetConfig` that keeps it, and the checks of option combinations."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, ClassVar

from models.blocks import BASE_FILTERS, SIDE_MULTIPLE, nearest_multiple
from recipes.cli import RecipeArgumentParser, add_run_options
from recipes.config import PATH, RunConfig
from recipes.errors import UsageError
from recipes.option_types import fraction, non_negative_float, non_negative_int, positive_float, positive_int
from trainer_datasets import IGNORE_INDEX, MASK_MODES
from trainer_datasets.segmentation_stream import DATA_MODES

__all__ = ["build_parser"]

ARCHITECTURES = ("NestedUNet", "UNet")
#: The ``--scheduler`` choices; warmup-cosine steps after each optimizer step, the others per epoch.
SCHEDULERS = ("warmup-cosine", "cosine", "plateau", "none")
RUNS_ROOT = "runs/nested_unet"
# The default run, sized for the slower kind of 2-core CPU (AVX2, no native bf16, so float32):
# NestedUNet passes 0.90 validation IoU on the built-in data within 90 s there, first run
# included. 144 steps with the warm-up and per-step cosine of --scheduler warmup-cosine end at
# 0.91-0.93 IoU over seeds and precisions; more images seen once or twice beat fewer seen often.
BUILTIN_TRAIN_SAMPLES = 288
BUILTIN_VAL_SAMPLES = 64
BUILTIN_IMAGE_SIZE = 64
DEFAULT_BATCH_SIZE = 4
DEFAULT_EPOCHS = 2


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The training command's options.

    Args:
        description: the text ``--help`` shows above them (the recipe's usage).
    """
    parser = RecipeArgumentParser(
        prog="python -m recipes.nested_unet",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data",
        metavar="PATH",
        help="segmentation folder (images/ and masks/, or train/ and val/ holding them); "
        "default: the built-in synthetic nuclei",
    )
    _add_model_options(parser)
    _add_training_options(parser)
    _add_data_options(parser)
    _add_folder_options(parser)
    add_run_options(parser, RUNS_ROOT, NestedUNetConfig.RESUMABLE)
    return parser


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--arch``, ``--base-filters``, ``--deep-supervision``."""
    parser.add_argument(
        "--arch", choices=sorted(ARCHITECTURES), default="NestedUNet", help="network (default: %(default)s)"
    )
    parser.add_argument(
        "--base-filters",
        type=positive_int,
        default=BASE_FILTERS,
        help="channels of the network's first level, doubled at each level below (default: "
        "%(default)s; smaller is faster and less accurate)",
    )
    parser.add_argument(
        "--deep-supervision",
        action="store_true",
        help="NestedUNet only: train the four heads on X(0,1..4) and average their losses",
    )


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    """``--epochs``, ``--batch-size``, ``--lr``, ``--weight-decay``, ``--optimizer``, ``--scheduler``."""
    parser.add_argument(
        "--epochs", type=positive_int, default=DEFAULT_EPOCHS, help="training epochs (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help="samples per step (default: %(default)s)"
    )
    parser.add_argument("--lr", type=positive_float, default=3e-3, help="initial learning rate (default: %(default)s)")
    parser.add_argument(
        "--weight-decay", type=non_negative_float, default=1e-4, help="L2 weight decay (default: %(default)s)"
    )
    parser.add_argument(
        "--optimizer",
        choices=["adam", "sgd"],
        default="adam",
        help="adam, or sgd with Nesterov momentum 0.9 (default: %(default)s)",
    )
    parser.add_argument(
        "--scheduler",
        choices=list(SCHEDULERS),
        default="warmup-cosine",
        help="learning-rate schedule: warmup-cosine rises over the first tenth of the steps, then "
        "anneals to 1%% of --lr by the last step, step by step; cosine anneals epoch by epoch; "
        "plateau multiplies it by 0.1 when the validation loss plateaus for 2 epochs; none keeps it "
        "(default: %(default)s)",
    )


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    """``--image-size``, ``--val-fraction``, and the built-in data's ``--train-samples``, ``--val-samples``."""
    parser.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="square side images are resized to, a multiple of 16 (default: "
        f"{BUILTIN_IMAGE_SIZE} for the built-in data; a folder's own size, which must then "
        "be the same for every image)",
    )
    parser.add_argument(
        "--val-fraction",
        type=fraction,
        default=0.2,
        help="share of a --data folder held out for validation when it has no train/ and "
        "val/ sub-folders (default: %(default)s)",
    )
    parser.add_argument(
        "--train-samples",
        type=positive_int,
        default=BUILTIN_TRAIN_SAMPLES,
        help="built-in data only: training images (default: %(default)s)",
    )
    parser.add_argument(
        "--val-samples",
        type=positive_int,
        default=BUILTIN_VAL_SAMPLES,
        help="built-in data only: validation images (default: %(default)s)",
    )


def _add_folder_options(parser: argparse.ArgumentParser) -> None:
    """What a ``--data`` folder holds and how it is read: ``--mask-mode``, ``--ignore-index``,
    ``--workers``, ``--data-mode``."""
    parser.add_argument(
        "--mask-mode",
        choices=MASK_MODES,
        default="auto",
        help="what --data's masks are: binary masks, one per class folder (each class its own "
        "sigmoid: multi-label) or directly in masks/; or labels: masks/<id>.png label maps of "
        "class indices (grey or palette PNG), exclusive classes (softmax); auto: labels when "
        "the folder has a classes.txt, else binary (default: %(default)s)",
    )
    parser.add_argument(
        "--ignore-index",
        type=non_negative_int,
        default=IGNORE_INDEX,
        help="label maps: the value of pixels of no class, left out of loss and metrics (default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=non_negative_int,
        default=0,
        help="data-loading worker processes for --data folders (default: %(default)s)",
    )
    parser.add_argument(
        "--data-mode",
        choices=DATA_MODES,
        default="auto",
        help="--data folders: memory decodes every image up front, stream checks them once (an index "
        "in the cache folder) and decodes each in the loader's workers, auto streams folders "
        "over 1 GiB decoded; both give the same batches, and a resumed run may change it "
        "(default: %(default)s)",
    )


def validate_config(config: NestedUNetConfig) -> None:
    """Checks that need no data: option combinations."""
    if config.deep_supervision and config.arch != "NestedUNet":
        raise UsageError("--deep-supervision needs --arch NestedUNet")
    if config.image_size is not None and config.image_size % SIDE_MULTIPLE:
        raise UsageError(
            f"--image-size {config.image_size} is not a multiple of {SIDE_MULTIPLE}; try "
            f"{nearest_multiple(config.image_size)}"
        )


@dataclass(kw_only=True, eq=False)
class NestedUNetConfig(RunConfig):
    """A run of this recipe: the options of `build_parser` (each field is the option of its
    name), and what the run records of its data.

    Attributes:
        data: the segmentation folder, or None for the built-in synthetic nuclei.
        arch: ``NestedUNet`` or ``UNet``.
        base_filters: channels of the network's first level (runs from before it: 32).
        deep_supervision: NestedUNet trains its four heads.
        batch_size: samples per step.
        lr: initial learning rate.
        weight_decay: L2 weight decay.
        optimizer: ``adam`` or ``sgd``.
        scheduler: ``warmup-cosine``, ``cosine``, ``plateau`` or ``none``.
        image_size: square side images are resized to (None: a folder's own size).
        val_fraction: share of a folder held out for validation.
        train_samples: training images of the built-in data.
        val_samples: validation images of the built-in data.
        workers: data-loading worker processes for a folder.
        data_mode: ``memory``, ``stream`` or ``auto`` (see `split_segmentation`); a resumed run may
            change it (runs from before it read their folder as ``auto``).
        mask_mode: what a folder's masks are: ``auto``, ``binary`` or ``labels`` (see
            `trainer_datasets.segmentation_layout`).
        ignore_index: label maps: the value of pixels of no class.
        mask_type: ``binary`` or ``labels``, what the data turned out to hold, recorded by the
            first `build`.
        classes: the mask classes, recorded by the first `build`.
        data_files: the data folder's fingerprint (see `trainer_datasets.fingerprint.data_files`), recorded by
            the first `build` with ``--data``.
    """

    data: str | None = field(metadata=PATH)
    arch: str
    deep_supervision: bool
    base_filters: int = BASE_FILTERS
    batch_size: int
    lr: float
    weight_decay: float
    optimizer: str
    scheduler: str
    image_size: int | None
    val_fraction: float
    train_samples: int
    val_samples: int
    workers: int
    data_mode: str = "auto"
    mask_mode: str = "auto"
    ignore_index: int = IGNORE_INDEX
    mask_type: str | None = None
    classes: list[str] | None = None
    data_files: dict[str, Any] | None = None

    RESUMABLE: ClassVar[tuple[str, ...]] = (*RunConfig.RESUMABLE, "data_mode")
