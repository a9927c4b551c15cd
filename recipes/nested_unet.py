"""Nuclei segmentation with NestedUNet (UNet++) or UNet, logged to TensorBoard.

    python -m recipes.nested_unet                      # built-in synthetic nuclei, about a minute on 2 CPU cores
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
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from models import BCEDiceLoss, CEDiceLoss, DeepSupervisionLoss, NestedUNet, UNet, class_iou, dice, iou
from models.blocks import BASE_FILTERS, SIDE_MULTIPLE, nearest_multiple
from models.metrics import Metric, confusion_dice, confusion_iou
from recipes.cli import (
    CommandLine,
    run_cli,
)
from recipes.errors import UsageError
from recipes.nested_unet_options import BUILTIN_IMAGE_SIZE, NestedUNetConfig, build_parser, validate_config
from recipes.parts import RecipeParts
from recipes.prediction_files import check_class_names
from recipes.run_checks import check_recipe_config, check_same_data, check_weights
from recipes.segmentation import SegmentationRecipe
from trainer import Callback, ResumableSampler, WarmupCosineLR, ignore_stop_signals
from trainer.callbacks import (
    ConfusionMatrixCallback,
    GraphCallback,
    ImageGridCallback,
    PredictionFigureCallback,
    ProgressBar,
    TensorBoardCallback,
)
from trainer.distributed import is_distributed, is_rank_zero, shard_loader
from trainer_datasets import SyntheticNuclei, split_segmentation
from trainer_datasets.fingerprint import data_files
from trainer_datasets.segmentation_folder import SegmentationFolder
from trainer_datasets.segmentation_stream import SegmentationStream

__all__ = ["NestedUNetRecipe", "build_model", "main"]

#: A data set `load_data` makes: the built-in data in memory, or a folder's (``--data``).
LoadedSet = TensorDataset | SegmentationFolder | SegmentationStream
#: A data set made from a folder (``--data``).
FolderSet = SegmentationFolder | SegmentationStream

BUILTIN_CLASSES = ["nucleus"]


class PairDataset(Protocol):
    """A map-style data set of (image, mask) pairs."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]: ...


def load_data(config: NestedUNetConfig) -> tuple[LoadedSet, LoadedSet, list[str]]:
    """Training and validation sets and the names of the mask classes (the class folders, in
    order; ``mask`` for masks directly in masks/; label maps: their classes.txt or indices); bad
    data is a UsageError. The sets' ``mask_mode`` says whether they hold binary masks or label maps."""
    if config.data is None:
        size = config.image_size or BUILTIN_IMAGE_SIZE  # new_config sets it for the built-in data
        builtin_train = SyntheticNuclei(config.train_samples, image_size=size, seed=config.seed)
        builtin_val = SyntheticNuclei(config.val_samples, image_size=size, seed=config.seed + 10_000)
        # Generated once into memory: each epoch then reads plain tensors.
        return materialize(builtin_train), materialize(builtin_val), list(BUILTIN_CLASSES)
    try:
        train, val = split_segmentation(
            config.data,
            val_fraction=config.val_fraction,
            seed=config.seed,
            image_size=config.image_size,
            mode=config.data_mode,
            mask_mode=config.mask_mode,
            ignore_index=config.ignore_index,
        )
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    height, width = train.size  # known without decoding an image (a streamed one is decoded in its shard only)
    if width % SIDE_MULTIPLE or height % SIDE_MULTIPLE:
        raise UsageError(
            f"images of {config.data!r} are {height}x{width}; the U-Nets need sides that are "
            f"multiples of {SIDE_MULTIPLE}: pass --image-size (e.g. {nearest_multiple(width)})"
        )
    return train, val, list(train.classes)


def materialize(dataset: PairDataset) -> TensorDataset:
    """Stack a small map-style dataset of (image, mask) pairs into tensors."""
    images, masks = zip(*(dataset[i] for i in range(len(dataset))))
    return TensorDataset(torch.stack(images), torch.stack(masks))


def build_model(
    arch: str, num_classes: int, deep_supervision: bool = False, base_filters: int = BASE_FILTERS
) -> nn.Module:
    """The network of `arch` on RGB images.

    Args:
        arch: ``NestedUNet`` or ``UNet``.
        num_classes: output maps, one per class.
        deep_supervision: NestedUNet only: four heads, on X(0,1..4).
        base_filters: channels of the first level, doubled at each level below.
    """
    if arch == "NestedUNet":
        return NestedUNet(
            num_classes=num_classes, input_channels=3, deep_supervision=deep_supervision, base_filters=base_filters
        )
    return UNet(num_classes=num_classes, input_channels=3, base_filters=base_filters)


def build_optimizer(
    config: NestedUNetConfig, model: nn.Module, device: torch.device | None = None, steps_per_epoch: int = 1
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """Optimizer and learning-rate scheduler of the configuration. On the CPU and CUDA the
    optimizer is the fused kernel: on the CPU an Adam step of NestedUNet's 9.2M parameters takes
    about 6 ms instead of 36 ms (a sixth of a default-run step), and on CUDA it also lets a grad
    scaler skip steps without waiting on the device.

    ``warmup-cosine`` (`trainer.WarmupCosineLR`, stepped after each optimizer step, see
    `scheduler_interval`) warms up over the first tenth of the ``epochs * steps_per_epoch`` steps
    and anneals to 1% of the rate by the last; ``cosine`` anneals epoch by epoch."""
    fused = True if device is None or device.type in ("cpu", "cuda") else None  # None: the optimizer's default
    optimizer: torch.optim.Optimizer
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=fused)
    else:
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=0.9,
            nesterov=True,
            weight_decay=config.weight_decay,
            fused=fused,
        )
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    if config.scheduler == "warmup-cosine":
        total = max(1, config.epochs * steps_per_epoch)
        scheduler = WarmupCosineLR(optimizer, total_steps=total, warmup_steps=total // 10, final_factor=0.01)
    elif config.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs, eta_min=config.lr * 0.01)
    elif config.scheduler == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=2)
    else:
        scheduler = None
    return optimizer, scheduler


def scheduler_interval(config: NestedUNetConfig) -> str:
    """When the configuration's scheduler steps: ``"step"`` (after each optimizer step) or ``"epoch"``."""
    return "step" if config.scheduler == "warmup-cosine" else "epoch"


def steps_per_epoch(train_loader: DataLoader) -> int:
    """The optimizer steps of an epoch of `train_loader` in this process: its batches, or under
    torchrun those of this rank's shard (`trainer.distributed.shard_loader`, as `Trainer.fit` makes it)."""
    return len(cast("DataLoader", shard_loader(train_loader, train=True)) if is_distributed() else train_loader)


@dataclass(kw_only=True)
class SegmentationParts(RecipeParts):
    """`RecipeParts` with the fixed validation batch the visual callbacks show.

    Attributes:
        fixed: the first validation images and masks.
    """

    fixed: tuple[torch.Tensor, torch.Tensor]


class NestedUNetRecipe(SegmentationRecipe[NestedUNetConfig, SegmentationParts]):
    """Nuclei segmentation: NestedUNet (or UNet) with BCE + Dice, Adam or SGD, warm-up and cosine schedule."""

    name = "nested_unet"
    monitor, mode, monitor_label = "val_iou", "max", "IoU"
    config_class = NestedUNetConfig

    def build_parser(self) -> argparse.ArgumentParser:
        return build_parser(__doc__)

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
        if config.data is None and config.image_size is None:
            config.image_size = BUILTIN_IMAGE_SIZE
        return config

    def build(self, config: NestedUNetConfig, device: torch.device) -> SegmentationParts:
        validate_config(config)
        train_set, val_set, classes = load_data(config)
        mask_type = record_data(config, train_set, val_set, classes)
        model = build_model(config.arch, len(classes), config.deep_supervision, config.base_filters)
        train_loader, val_loader = make_loaders(config, train_set, val_set, device)
        optimizer, scheduler = build_optimizer(config, model, device, steps_per_epoch(train_loader))
        fixed = fixed_batch(config, val_set, classes, mask_type)
        loss, metrics = loss_and_metrics(mask_type, classes, config.ignore_index)
        return SegmentationParts(
            model=model,
            loss_fn=DeepSupervisionLoss(loss),
            optimizer=optimizer,
            train_loader=train_loader,
            val_loader=val_loader,
            metrics=metrics,
            scheduler=scheduler,
            scheduler_interval=scheduler_interval(config),
            fixed=fixed,
            data={
                "classes": classes,
                "image_size": config.image_size,
                "input_channels": 3,
                "mask_type": mask_type,
                "ignore_index": config.ignore_index,
            },
        )

    def callbacks(self, run_dir: Path, config: NestedUNetConfig, parts: SegmentationParts) -> list[Callback]:
        fixed, classes = parts.fixed, list(parts.data["classes"])
        # The tag scheme of trainer.callbacks.tags: `Loss/training loss` every 10 steps, `Loss/...` and
        # `Validation/...` per epoch; the metrics get their usual names (and each class's IoU,
        # `iou_<class>`, follows as `Validation/IoU/<class>`).
        tags = {"val_iou": "Validation/IoU", "val_dice": "Validation/Dice"}
        ignore = config.ignore_index
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
            if parts.data["mask_type"] == "labels"
            else []
        )
        return [
            TensorBoardCallback(
                run_dir,
                every_n_steps=10,
                tags=tags,
                monitor="val_iou",
                mode="max",
                hparams={key: value for key, value in config.saved().items() if key != "data_files"},
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

    def rebuild_model(
        self, state: dict[str, Any], config: dict[str, Any], checkpoint: str | os.PathLike
    ) -> nn.Module | None:
        """This recipe's checkpoints from before they recorded their model (no ``format_version``),
        rebuilt from their options; before label maps (no ``mask_type``) they are binary masks, all
        that version trained. None for any other file without a model description."""
        if "arch" not in config:
            return None
        check_recipe_config(config, ("arch", "deep_supervision"), checkpoint, self.name)
        if not config.get("classes"):
            raise UsageError(
                f"{checkpoint} records no mask classes: it has no format_version, so an older version "
                "of this recipe wrote it; train it again with this one"
            )
        classes = check_class_names(config["classes"], checkpoint)
        width = config.get("base_filters", BASE_FILTERS)  # runs from before the option have the default
        model = build_model(config["arch"], len(classes), config["deep_supervision"], width)
        check_weights(model, state, checkpoint)
        model.load_state_dict(state["model"])
        if config.get("mask_type") is None:
            config["mask_type"] = "binary"
        return model


def record_data(config: NestedUNetConfig, train_set: LoadedSet, val_set: LoadedSet, classes: list[str]) -> str:
    """The ``mask_type`` of the data (``binary`` or ``labels``), recorded in `config` with its
    classes (and a folder's fingerprint) by a new run; a resumed run whose data changed since is a
    `UsageError`."""
    if config.data is not None:  # a resumed run must see the files it started on
        folders = cast("tuple[FolderSet, FolderSet]", (train_set, val_set))  # made from --data
        files = data_files(config.data, {*folders[0].layout.files(), *folders[1].layout.files()})
        if config.data_files is None:
            config.data_files = dict(files)
        check_same_data(config.data_files, files, config.data, "--data")
    if config.classes is None:
        config.classes = classes
    if config.classes != classes:
        raise UsageError(f"the run was trained on the classes {config.classes}, but {config.data} now has {classes}")
    mask_type = getattr(train_set, "mask_mode", "binary")  # the built-in data has binary masks
    if config.mask_type is None:
        config.mask_type = mask_type
    if config.mask_type != mask_type:
        raise UsageError(
            f"the run was trained on {config.mask_type} masks, but {config.data} now holds {mask_type} masks"
        )
    return mask_type


def make_loaders(
    config: NestedUNetConfig, train_set: LoadedSet, val_set: LoadedSet, device: torch.device
) -> tuple[DataLoader, DataLoader]:
    """The training and validation loaders: worker processes for a folder only, pinned memory on CUDA.

    The order of each epoch, and each sample's augmentation, depend on the seed, the epoch and the
    sample alone: a run resumed inside an epoch starts at its next batch and draws what the
    uninterrupted run drew, with any number of workers. Workers leave stop signals to this process.
    """
    workers = config.workers if config.data is not None else 0
    pin = device.type == "cuda"
    train_loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        sampler=ResumableSampler(train_set, seed=config.seed),
        num_workers=workers,
        drop_last=len(train_set) > config.batch_size,
        pin_memory=pin,
        worker_init_fn=ignore_stop_signals,
    )
    val_loader = DataLoader(
        val_set, batch_size=config.batch_size, num_workers=workers, pin_memory=pin, worker_init_fn=ignore_stop_signals
    )
    return train_loader, val_loader


def fixed_batch(
    config: NestedUNetConfig, val_set: LoadedSet, classes: list[str], mask_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 8 validation images and masks, which the visual callbacks show. Only rank 0 draws
    and logs them (and chooses the precision): the other ranks get zeros of their shape, no file read."""
    if is_rank_zero():
        images, masks = next(iter(DataLoader(val_set, batch_size=8)))
        return images, masks
    if config.data is None:
        image, mask = val_set[0]
    else:
        side = cast("FolderSet", val_set).size  # made from --data
        image = torch.zeros(3, *side)
        mask = torch.zeros(*side, dtype=torch.long) if mask_type == "labels" else torch.zeros(len(classes), *side)
    count = min(8, len(val_set))
    return image.new_zeros(count, *image.shape), mask.new_zeros(count, *mask.shape)


def loss_and_metrics(mask_type: str, classes: list[str], ignore_index: int) -> tuple[nn.Module, dict[str, Metric]]:
    """Label maps: cross-entropy + Dice over a softmax, ignored pixels counted nowhere, IoU and Dice
    from the confusion matrix (`ConfusionMatrixCallback`). Binary masks: BCE + Dice, IoU and Dice
    per batch, and each class's IoU (``iou_<class>``) with several."""
    if mask_type == "labels":
        return CEDiceLoss(ignore_index=ignore_index), {}
    metrics: dict[str, Metric] = {"iou": iou, "dice": dice}
    if len(classes) > 1:  # each class's IoU as its own scalar, named after its folder
        metrics.update({f"iou_{name}": class_iou(index) for index, name in enumerate(classes)})
    return BCEDiceLoss(), metrics


def main(argv: list[str] | None = None) -> int:
    """`python -m recipes.nested_unet [predict|export] ...`: train, predict or export; the exit code.

    Args:
        argv: the command-line arguments (default: ``sys.argv[1:]``).
    """
    return NestedUNetRecipe().main(argv)


if __name__ == "__main__":
    sys.exit(run_cli(main))
