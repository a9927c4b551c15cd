"""Nuclei segmentation with NestedUNet (UNet++) or UNet, logged to TensorBoard.

    python -m recipes.nested_unet                      # built-in synthetic nuclei, under 3 min on 2 CPU cores
    python -m recipes.nested_unet --data inputs/dsb2018_96 --epochs 100 --image-size 96
    python -m recipes.nested_unet --resume runs/nested_unet/20261127-101500
    python -m recipes.nested_unet predict --checkpoint RUN/best.pt --images DIR --out DIR   # see predict --help
    python -m recipes.nested_unet export --checkpoint RUN/best.pt --out model.pt   # weights only, for deployment

`--data` takes the folder layout <root>/images/<id>.png with <root>/masks/<class>/<id>.png
(or <root>/masks/<id>.png), optionally split into train/ and val/ sub-folders. Masks are binary
(sigmoid per class) unless the folder has a classes.txt or --mask-mode labels is given: then
masks/<id>.png are label maps of class indices (softmax, cross-entropy + Dice, --ignore-index).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from models import BCEDiceLoss, CEDiceLoss, DeepSupervisionLoss, NestedUNet, UNet, class_iou, dice, iou
from models.blocks import BASE_FILTERS, SIDE_MULTIPLE, nearest_multiple
from models.losses import MASK_TYPES
from models.metrics import Metric, confusion_dice, confusion_iou
from models.predict import count_outputs
from recipes.cli import CommandLine
from recipes.common import (
    PATH,
    Recipe,
    RecipeArgumentParser,
    RecipeParts,
    RunConfig,
    UsageError,
    add_run_options,
    device_option,
    fraction,
    lock_run_dir,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    run_cli,
)
from recipes.prediction import (
    INCOMPLETE_FILE,
    add_prediction_options,
    check_class_names,
    check_images,
    check_outputs,
    check_prediction_options,
    data_folder_above,
    inference_precision,
    predict_folder,
    remove_partial_files,
)
from recipes.run_checks import check_recipe_config, check_same_data, check_weights, data_files
from trainer import Callback, ResumableSampler, ignore_stop_signals, resolve_device
from trainer.callbacks import (
    ConfusionMatrixCallback,
    GraphCallback,
    ImageGridCallback,
    PredictionFigureCallback,
    ProgressBar,
    TensorBoardCallback,
)
from trainer.checkpoint import load_checkpoint
from trainer.distributed import is_rank_zero
from trainer.model_spec import short_repr
from trainer.trained_model import export_model, model_from_state
from trainer.workers import STOP_SIGNALS
from trainer_datasets import IGNORE_INDEX, MASK_MODES, SyntheticNuclei, split_segmentation
from trainer_datasets.segmentation_folder import SegmentationFolder
from trainer_datasets.segmentation_stream import DATA_MODES, SegmentationStream

#: A data set `load_data` makes: the built-in data in memory, or a folder's (``--data``).
LoadedSet = TensorDataset | SegmentationFolder | SegmentationStream
#: A data set made from a folder (``--data``).
FolderSet = SegmentationFolder | SegmentationStream

ARCHITECTURES = {"NestedUNet": NestedUNet, "UNet": UNet}
RUNS_ROOT = "runs/nested_unet"
# The default run, sized for the slower kind of 2-core CPU (AVX2, no native bf16, so float32):
# NestedUNet passes 0.90 validation IoU on the built-in data in under 3 minutes there.
BUILTIN_TRAIN_SAMPLES = 192
BUILTIN_VAL_SAMPLES = 64
BUILTIN_IMAGE_SIZE = 64
DEFAULT_BATCH_SIZE = 4
DEFAULT_EPOCHS = 4


def build_parser() -> argparse.ArgumentParser:
    """The training command's options."""
    parser = RecipeArgumentParser(
        prog="python -m recipes.nested_unet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data",
        metavar="PATH",
        help="segmentation folder (images/ and masks/, or train/ and val/ holding them); "
        "default: the built-in synthetic nuclei",
    )
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
        choices=["cosine", "plateau", "none"],
        default="cosine",
        help="learning-rate schedule: cosine annealing over the epochs, x0.1 when the "
        "validation loss plateaus for 2 epochs, or constant (default: %(default)s)",
    )
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
    add_run_options(parser, RUNS_ROOT, NestedUNetConfig.RESUMABLE)
    return parser


def build_predict_parser() -> argparse.ArgumentParser:
    """The `predict` command's options."""
    parser = RecipeArgumentParser(
        prog="python -m recipes.nested_unet predict",
        description="Write a probability map and a binary mask PNG per image, at the image's own size: "
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
        "--overwrite).",
    )
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
    return parser


BUILTIN_CLASSES = ["nucleus"]


class PairDataset(Protocol):
    """A map-style data set of (image, mask) pairs."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]: ...


def load_data(config: Mapping[str, Any]) -> tuple[LoadedSet, LoadedSet, list[str]]:
    """Training and validation sets and the names of the mask classes (the class folders, in
    order; ``mask`` for masks directly in masks/; label maps: their classes.txt or indices); bad
    data is a UsageError. The sets' ``mask_mode`` says whether they hold binary masks or label maps."""
    if config["data"] is None:
        size = config["image_size"]
        builtin_train = SyntheticNuclei(config["train_samples"], image_size=size, seed=config["seed"])
        builtin_val = SyntheticNuclei(config["val_samples"], image_size=size, seed=config["seed"] + 10_000)
        # Generated once into memory: each epoch then reads plain tensors.
        return materialize(builtin_train), materialize(builtin_val), list(BUILTIN_CLASSES)
    try:
        train, val = split_segmentation(
            config["data"],
            val_fraction=config["val_fraction"],
            seed=config["seed"],
            image_size=config["image_size"],
            mode=config.get("data_mode", "auto"),
            mask_mode=config.get("mask_mode", "auto"),
            ignore_index=config.get("ignore_index", IGNORE_INDEX),
        )
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    height, width = train.size  # known without decoding an image (a streamed one is decoded in its shard only)
    if width % SIDE_MULTIPLE or height % SIDE_MULTIPLE:
        raise UsageError(
            f"images of {config['data']!r} are {height}x{width}; the U-Nets need sides that are "
            f"multiples of {SIDE_MULTIPLE}: pass --image-size (e.g. {nearest_multiple(width)})"
        )
    return train, val, list(train.classes)


def materialize(dataset: PairDataset) -> TensorDataset:
    """Stack a small map-style dataset of (image, mask) pairs into tensors."""
    images, masks = zip(*(dataset[i] for i in range(len(dataset))))
    return TensorDataset(torch.stack(images), torch.stack(masks))


def build_model(config: Mapping[str, Any], num_classes: int) -> nn.Module:
    """The configured network."""
    width = config.get("base_filters", BASE_FILTERS)  # runs from before the option have the default
    if config["arch"] == "NestedUNet":
        return NestedUNet(
            num_classes=num_classes, input_channels=3, deep_supervision=config["deep_supervision"], base_filters=width
        )
    return UNet(num_classes=num_classes, input_channels=3, base_filters=width)


def build_optimizer(
    config: Mapping[str, Any], model: nn.Module, device: torch.device | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """Optimizer and learning-rate scheduler of the configuration. On CUDA the optimizer is the
    fused kernel, which also lets a grad scaler skip steps without waiting on the device."""
    fused = True if device is not None and device.type == "cuda" else None  # None: the optimizer's default
    optimizer: torch.optim.Optimizer
    if config["optimizer"] == "adam":
        optimizer = torch.optim.Adam(
            model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"], fused=fused
        )
    else:
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=config["lr"],
            momentum=0.9,
            nesterov=True,
            weight_decay=config["weight_decay"],
            fused=fused,
        )
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    if config["scheduler"] == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=config["epochs"], eta_min=config["lr"] * 0.01
        )
    elif config["scheduler"] == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=2)
    else:
        scheduler = None
    return optimizer, scheduler


def validate_config(config: Mapping[str, Any]) -> None:
    """Checks that need no data: option combinations."""
    if config["deep_supervision"] and config["arch"] != "NestedUNet":
        raise UsageError("--deep-supervision needs --arch NestedUNet")
    if config["image_size"] is not None and config["image_size"] % SIDE_MULTIPLE:
        raise UsageError(
            f"--image-size {config['image_size']} is not a multiple of {SIDE_MULTIPLE}; try "
            f"{nearest_multiple(config['image_size'])}"
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
        scheduler: ``cosine``, ``plateau`` or ``none``.
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
        data_files: the data folder's fingerprint (see `recipes.run_checks.data_files`), recorded by
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
    data_files: dict[str, int] | None = None

    RESUMABLE: ClassVar[tuple[str, ...]] = (*RunConfig.RESUMABLE, "data_mode")


@dataclass(kw_only=True)
class SegmentationParts(RecipeParts):
    """`RecipeParts` with the fixed validation batch the visual callbacks show.

    Attributes:
        fixed: the first validation images and masks.
    """

    fixed: tuple[torch.Tensor, torch.Tensor]


class NestedUNetRecipe(Recipe[NestedUNetConfig, SegmentationParts]):
    """Nuclei segmentation: NestedUNet (or UNet) with BCE + Dice, Adam or SGD, cosine schedule."""

    name = "nested_unet"
    monitor, mode, monitor_label = "val_iou", "max", "IoU"
    config_class = NestedUNetConfig
    build_parser = staticmethod(build_parser)

    def new_config(self, command: CommandLine) -> NestedUNetConfig:
        args, given = command.args, command.given
        ignored = (
            ("train_samples", "val_samples")
            if args.data is not None
            else ("val_fraction", "workers", "data_mode", "mask_mode", "ignore_index")
        )
        refused = [given[dest] for dest in ignored if dest in given]
        if refused:
            source = f"--data {args.data}" if args.data is not None else "the built-in data (no --data)"
            raise UsageError(
                f"{' and '.join(refused)} {'has' if len(refused) == 1 else 'have'} no effect with "
                f"{source}; leave {'it' if len(refused) == 1 else 'them'} out (--train-samples and "
                "--val-samples size the built-in data; --val-fraction, --workers, --data-mode, "
                "--mask-mode and --ignore-index apply to --data)"
            )
        config = super().new_config(command)
        if config["data"] is None and config["image_size"] is None:
            config["image_size"] = BUILTIN_IMAGE_SIZE
        return config

    def build(self, config: NestedUNetConfig, device: torch.device) -> SegmentationParts:
        validate_config(config)
        train_set, val_set, classes = load_data(config)
        if config["data"] is not None:  # a resumed run must see the files it started on
            folders = cast("tuple[FolderSet, FolderSet]", (train_set, val_set))  # made from --data
            files = data_files(config["data"], {*folders[0].layout.files(), *folders[1].layout.files()})
            check_same_data(config.setdefault("data_files", files), files, config["data"], "--data")
        if config.setdefault("classes", classes) != classes:
            raise UsageError(
                f"the run was trained on the classes {config['classes']}, but {config['data']} now has {classes}"
            )
        mask_type = getattr(train_set, "mask_mode", "binary")  # the built-in data has binary masks
        if config.setdefault("mask_type", mask_type) != mask_type:
            raise UsageError(
                f"the run was trained on {config['mask_type']} masks, but {config['data']} now holds {mask_type} masks"
            )
        model = build_model(config, len(classes))
        optimizer, scheduler = build_optimizer(config, model, device)
        workers = config["workers"] if config["data"] is not None else 0
        pin = device.type == "cuda"
        # The order of each epoch, and each sample's augmentation, depend on the seed, the epoch and
        # the sample alone: a run resumed inside an epoch starts at its next batch and draws what the
        # uninterrupted run drew, with any number of workers. Workers leave stop signals to this process.
        train_loader = DataLoader(
            train_set,
            batch_size=config["batch_size"],
            sampler=ResumableSampler(train_set, seed=config["seed"]),
            num_workers=workers,
            drop_last=len(train_set) > config["batch_size"],
            pin_memory=pin,
            worker_init_fn=ignore_stop_signals,
        )
        val_loader = DataLoader(
            val_set,
            batch_size=config["batch_size"],
            num_workers=workers,
            pin_memory=pin,
            worker_init_fn=ignore_stop_signals,
        )
        if is_rank_zero():
            fixed = next(iter(DataLoader(val_set, batch_size=8)))
        else:  # only rank 0 draws and logs it (and chooses the precision): the others need its shape, no files read
            labels = mask_type == "labels"
            if config["data"] is None:
                image, mask = val_set[0]
            else:
                side = cast("FolderSet", val_set).size  # made from --data
                image = torch.zeros(3, *side)
                mask = torch.zeros(*side, dtype=torch.long) if labels else torch.zeros(len(classes), *side)
            count = min(8, len(val_set))
            fixed = [image.new_zeros(count, *image.shape), mask.new_zeros(count, *mask.shape)]
        if mask_type == "labels":  # exclusive classes: softmax; ignored pixels count nowhere
            ignore = config["ignore_index"]
            loss: nn.Module = CEDiceLoss(ignore_index=ignore)
            metrics: dict[str, Metric] = {}  # IoU and Dice of the whole validation: ConfusionMatrixCallback
        else:
            loss = BCEDiceLoss()
            metrics = {"iou": iou, "dice": dice}
            if len(classes) > 1:  # each class's IoU as its own scalar, named after its folder
                metrics.update({f"iou_{name}": class_iou(index) for index, name in enumerate(classes)})
        return SegmentationParts(
            model=model,
            loss_fn=DeepSupervisionLoss(loss),
            optimizer=optimizer,
            train_loader=train_loader,
            val_loader=val_loader,
            metrics=metrics,
            example=fixed[0][:1].expand(config["batch_size"], -1, -1, -1).contiguous(),
            scheduler=scheduler,
            fixed=fixed,
            data={
                "classes": classes,
                "image_size": config["image_size"],
                "input_channels": 3,
                "mask_type": mask_type,
                "ignore_index": config["ignore_index"],
            },
        )

    def callbacks(self, run_dir: Path, config: NestedUNetConfig, parts: SegmentationParts) -> list[Callback]:
        fixed, classes = parts.fixed, config["classes"]
        # The tag scheme of trainer.callbacks.tags: `Loss/training loss` every 10 steps, `Loss/...` and
        # `Validation/...` per epoch; the metrics get their usual names (and each class's IoU,
        # `iou_<class>`, follows as `Validation/IoU/<class>`).
        tags = {"val_iou": "Validation/IoU", "val_dice": "Validation/Dice"}
        ignore = config.get("ignore_index", IGNORE_INDEX)
        confusion = (
            [
                ConfusionMatrixCallback(
                    run_dir,
                    classes,
                    ignore_index=ignore,
                    metrics={"iou": confusion_iou, "dice": confusion_dice},
                    per_class=["iou"],
                )
            ]
            if config.get("mask_type") == "labels"
            else []
        )
        return [
            TensorBoardCallback(
                run_dir,
                every_n_steps=10,
                tags=tags,
                monitor="val_iou",
                mode="max",
                hparams={key: value for key, value in config.items() if key != "data_files"},
            ),
            ImageGridCallback(
                run_dir, batch=fixed, num_images=8, nrow=4, classes=classes, stretch=True, ignore_index=ignore
            ),
            GraphCallback(run_dir, example=fixed[0][:2]),
            PredictionFigureCallback(
                run_dir,
                kind="segmentation",
                batch=fixed,
                num_images=4,
                classes=classes,
                stretch=True,
                ignore_index=ignore,
            ),
            *confusion,
            ProgressBar(every_n_steps=5),
        ]


def train(argv: list[str] | None) -> int:
    """Train (or resume) a run; returns the exit code."""
    return NestedUNetRecipe().train(argv)


def load_trained_model(
    checkpoint: str | os.PathLike, device: str | torch.device = "cpu", allowed: Iterable[type] = ()
) -> tuple[nn.Module, dict[str, Any]]:
    """The trained network of a segmentation checkpoint (of this recipe or any other that records
    its model, see `trainer.load_model`) and what predicting needs to know of the run.

    The network has the checkpoint's weights, sits on `device` in eval mode, and is channels-last
    if the run trained so. The returned configuration is the run's, with ``classes`` (one per
    output channel), ``image_size`` (None: trained at the images' own resolution) and
    ``mask_type`` (how the outputs are read: ``labels``, a softmax and one label map; ``binary``,
    a sigmoid and a mask per class) taken from the checkpoint's ``data`` where it records them.

    Nothing is guessed. A missing or unreadable file, one that does not rebuild its model, or one
    that records no class names or no ``mask_type`` (or one outside `models.losses.MASK_TYPES`)
    is a `UsageError` saying what the file is and what it lacks or what to add; so are class names
    that cannot name output files (`recipes.prediction.check_class_names`: ``..``, ``a/b``, a
    control character...) and a count of names other than the maps the model predicts
    (`models.predict.count_outputs`). Only this recipe's files from before checkpoints recorded
    their model (no ``format_version``) and before label maps (no ``mask_type``) are read as
    binary masks: all that version trained.

    Args:
        checkpoint: ``RUN/best.pt`` or ``RUN/last.pt`` of a segmentation run.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a `torch.device`.
        allowed: model classes to rebuild besides PyTorch's layers and the project's models.
    """
    try:
        state = load_checkpoint(checkpoint)
        device = resolve_device(device)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    config = dict(state.get("config") or {})
    data = state.get("data") or {}
    if "model_spec" in state or "arch" not in config:
        try:
            model = model_from_state(state, checkpoint, allowed=allowed)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    else:  # this recipe's, written before checkpoints recorded their model: rebuilt from its options
        check_recipe_config(config, ("arch", "deep_supervision"), checkpoint, NestedUNetRecipe.name)
        if not config.get("classes"):
            raise UsageError(
                f"{checkpoint} records no mask classes: it has no format_version, so an older version "
                "of this recipe wrote it; train it again with this one"
            )
        model = build_model(config, num_classes=len(check_class_names(config["classes"], checkpoint)))
        check_weights(model, state, checkpoint)
        model.load_state_dict(state["model"])
        if config.get("mask_type") is None:  # written before label maps: binary masks were all it trained on
            config["mask_type"] = "binary"
    config.update({key: data[key] for key in ("classes", "image_size", "mask_type") if key in data})
    what = f"{checkpoint} (a checkpoint of {type(model).__name__})"
    if not config.get("classes"):
        raise UsageError(
            f"{what} records no class names (no 'classes' in its data or config); predict names "
            "its outputs after them: train with ModelCheckpoint(data={'classes': [...]}) or a recipe "
            "whose RecipeParts.data gives them"
        )
    channels = data.get("input_channels", getattr(model, "input_channels", 3))
    if channels != 3:  # first: such a file is no segmentation model at all, whatever its class names
        raise UsageError(f"{what} takes {channels}-channel inputs; predict feeds RGB images (3 channels)")
    classes = config["classes"] = check_class_names(config["classes"], what)
    mask_type = config.get("mask_type")
    if mask_type is None or mask_type not in MASK_TYPES:
        recorded = (
            "does not record how its outputs are read (no 'mask_type' in its data)"
            if mask_type is None
            else f"records mask_type {short_repr(2, 4, 40).repr(mask_type)}, which predict does not read"
        )
        raise UsageError(
            f"{what} {recorded}; record data['mask_type'] (RecipeParts.data, ModelCheckpoint(data=...)) as "
            "'labels' for a softmax over the classes (one label map per image, e.g. trained with cross-entropy) "
            "or 'binary' for a sigmoid per class (a mask per class, e.g. trained with BCE); nothing written"
        )
    config.setdefault("image_size", None)
    model.to(device).eval()
    try:
        outputs = count_outputs(model, channels)
    except RuntimeError as exc:
        raise UsageError(f"{what} does not run on a 64x64 RGB input: {' '.join(str(exc).split())[:300]}") from None
    if outputs != len(classes):
        raise UsageError(
            f"{what} records {len(classes)} class name{'' if len(classes) == 1 else 's'} ({', '.join(classes)}) "
            f"for a model that predicts {outputs} map{'' if outputs == 1 else 's'}: each map needs one name; "
            "nothing written"
        )
    if config.get("channels_last") is True:
        model.to(memory_format=torch.channels_last)
    return model, config


def predict(argv: list[str]) -> int:
    """Write probability maps and masks for a folder of images; returns the exit code."""
    args = build_predict_parser().parse_args(argv)
    check_prediction_options(args)
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
    model, config = load_trained_model(args.checkpoint, args.device)
    files = check_images(args.images)
    labels = config.get("mask_type") == "labels"
    check_outputs(out, files, config["classes"], args.overwrite, labels, args.probabilities)

    if args.image_size is not None:
        image_size, scale = (
            args.image_size,
            f"every image resized to {args.image_size}x{args.image_size} (--image-size)",
        )
    elif args.scale == "native" or config["image_size"] is None:
        image_size, scale = None, "each image at its own resolution"
        scale += " (--scale native)" if config["image_size"] is not None else ", as the run trained"
    else:
        image_size = config["image_size"]
        scale = (
            f"every image resized to {image_size}x{image_size}, as the run trained (--scale native: each "
            f"image at its own resolution)"
        )
    device = next(model.parameters()).device
    precision, reason = inference_precision(config, device)
    channels_last = config.get("channels_last") is True
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create --out {args.out!r}: {exc.strerror or exc}") from None
    with lock_run_dir(out, f"--out {args.out!r}"):
        check_outputs(
            out,
            files,
            config["classes"],
            args.overwrite,
            labels,  # again: another command may have written
            args.probabilities,
        )
        remove_partial_files(out, config["classes"])  # left by a predict killed while writing
        print(
            f"scale: {scale}; precision: {reason}{', channels-last' if channels_last else ''}; "
            f"tiles up to {args.tile}x{args.tile}, overlap {args.overlap}",
            flush=True,
        )
        try:
            with stop_signals_raise():
                predict_folder(
                    model,
                    files,
                    out,
                    config["classes"],
                    image_size,
                    tile=args.tile,
                    overlap=args.overlap,
                    precision=precision,
                    channels_last=channels_last,
                    threshold=args.threshold,
                    labels=labels,
                    probabilities=args.probabilities,
                )
        except Stopped as exc:
            partial = (out / INCOMPLETE_FILE).exists()
            print(
                f"predict stopped by {exc.name}: "
                + (
                    f"the files in {out} are whole, but some images have no outputs: {out / INCOMPLETE_FILE} "
                    "marks the folder as partial until a predict with --overwrite completes it"
                    if partial
                    else "nothing written"
                ),
                file=sys.stderr,
            )
            raise SystemExit(128 + exc.signum) from None
    maps = len(files) * len(config["classes"])  # probability maps: one per image and class
    if labels:
        what = _counted(len(files), "label map")
        what += f" and {_counted(maps, 'probability map')}" if args.probabilities else ""
    else:
        what = f"{_counted(maps, 'probability map')} and {_counted(maps, 'mask')}"
    print(f"wrote {what} to {out}")
    return 0


def _counted(count: int, noun: str) -> str:
    """``1 mask``, ``2 masks``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def build_export_parser() -> argparse.ArgumentParser:
    """The `export` command's options."""
    parser = RecipeArgumentParser(
        prog="python -m recipes.nested_unet export",
        description="Write the weights and the description of a checkpoint's model (class, constructor arguments, "
        "classes, image size, run options) without the optimizer and training state: a third of the "
        "size, for deployment. `predict` and trainer.load_model read it; it cannot resume a run.",
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint of a run (RUN/best.pt or last.pt)")
    parser.add_argument("--out", required=True, help="the file to write (e.g. model.pt); never replaced")
    return parser


def export(argv: list[str]) -> int:
    """Write a weights-only copy of a checkpoint; returns the exit code.

    The file is written whole or not at all, through a temporary file beside it
    (``.NAME.PID.tmp``) that every exit Python controls removes (an error, Ctrl-C, SIGTERM); one
    that a killed export (SIGKILL) left is removed by the next export to the same file.
    """
    args = build_export_parser().parse_args(argv)
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


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived during `stop_signals_raise`; a `BaseException`, as
    `KeyboardInterrupt`, so that no ``except Exception`` holds it up.

    Attributes:
        signum: the signal.
        name: its name (``SIGTERM``).
    """

    def __init__(self, signum: int) -> None:
        self.signum, self.name = signum, signal.Signals(signum).name
        super().__init__(f"stopped by {self.name}")


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM raise `Stopped` in this process (in its main
    thread; elsewhere nothing changes), so that the ``finally`` clauses of the writes in progress
    run and remove their temporary files before the command exits; SIGTERM's default would end
    the process at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: list[str] | None = None) -> int:
    """`python -m recipes.nested_unet [predict|export] ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "predict":
        return predict(argv[1:])
    if argv and argv[0] == "export":
        return export(argv[1:])
    return train(argv)


if __name__ == "__main__":
    sys.exit(run_cli(main))
