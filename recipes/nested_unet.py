"""Nuclei segmentation with NestedUNet (UNet++) or UNet, logged to TensorBoard.

    python -m recipes.nested_unet                      # built-in synthetic nuclei, under 3 min on 2 CPU cores
    python -m recipes.nested_unet --data inputs/dsb2018_96 --epochs 100 --image-size 96
    python -m recipes.nested_unet --resume runs/nested_unet/20261127-101500
    python -m recipes.nested_unet predict --checkpoint RUN/best.pt --images DIR --out DIR   # see predict --help

`--data` takes the folder layout <root>/images/<id>.png with <root>/masks/<class>/<id>.png
(or <root>/masks/<id>.png), optionally split into train/ and val/ sub-folders.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from trainer_datasets import SyntheticNuclei, split_segmentation
from models import (SIDE_MULTIPLE, BCEDiceLoss, DeepSupervisionLoss, NestedUNet, UNet, class_iou, dice, iou,
                    nearest_multiple)
from recipes.common import (Recipe, RecipeArgumentParser, RecipeParts, UsageError, add_run_options, device_option,
                            fraction, lock_run_dir, non_negative_float, non_negative_int, positive_float, positive_int,
                            run_cli)
from recipes.prediction import (add_prediction_options, check_images, check_outputs, check_prediction_options,
                                data_folder_above, inference_precision, predict_folder)
from recipes.run_checks import check_recipe_config, check_same_data, check_weights, data_files
from trainer import Callback, ResumableSampler, ignore_stop_signals, resolve_device
from trainer.callbacks import (GraphCallback, ImageGridCallback, PredictionFigureCallback, ProgressBar,
                               TensorBoardCallback)
from trainer.checkpoint import load_checkpoint

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
        prog="python -m recipes.nested_unet", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", metavar="PATH",
                        help="segmentation folder (images/ and masks/, or train/ and val/ holding them); "
                             "default: the built-in synthetic nuclei")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="NestedUNet",
                        help="network (default: %(default)s)")
    parser.add_argument("--deep-supervision", action="store_true",
                        help="NestedUNet only: train the four heads on X(0,1..4) and average their losses")
    parser.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS,
                        help="training epochs (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                        help="samples per step (default: %(default)s)")
    parser.add_argument("--lr", type=positive_float, default=3e-3, help="initial learning rate (default: %(default)s)")
    parser.add_argument("--weight-decay", type=non_negative_float, default=1e-4,
                        help="L2 weight decay (default: %(default)s)")
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                        help="adam, or sgd with Nesterov momentum 0.9 (default: %(default)s)")
    parser.add_argument("--scheduler", choices=["cosine", "plateau", "none"], default="cosine",
                        help="learning-rate schedule: cosine annealing over the epochs, x0.1 when the "
                             "validation loss plateaus for 2 epochs, or constant (default: %(default)s)")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="square side images are resized to, a multiple of 16 (default: "
                             f"{BUILTIN_IMAGE_SIZE} for the built-in data; a folder's own size, which must then "
                             "be the same for every image)")
    parser.add_argument("--val-fraction", type=fraction, default=0.2,
                        help="share of a --data folder held out for validation when it has no train/ and "
                             "val/ sub-folders (default: %(default)s)")
    parser.add_argument("--train-samples", type=positive_int, default=BUILTIN_TRAIN_SAMPLES,
                        help="built-in data only: training images (default: %(default)s)")
    parser.add_argument("--val-samples", type=positive_int, default=BUILTIN_VAL_SAMPLES,
                        help="built-in data only: validation images (default: %(default)s)")
    parser.add_argument("--workers", type=non_negative_int, default=0,
                        help="data-loading worker processes for --data folders (default: %(default)s)")
    add_run_options(parser, RUNS_ROOT)
    return parser


def build_predict_parser() -> argparse.ArgumentParser:
    """The `predict` command's options."""
    parser = RecipeArgumentParser(
        prog="python -m recipes.nested_unet predict",
        description="Write a probability map and a binary mask PNG per image, at the image's own size: "
                    "<out>/<id>_prob.png and <out>/<id>_mask.png, or with several classes "
                    "<out>/<class>/<id>_prob.png and <out>/<class>/<id>.png. Images of any size, grey, RGB or "
                    "RGBA, 8 or 16 bits, are predicted at the scale the checkpoint was trained at (--scale), "
                    "large ones in blended tiles (--tile), same-sized ones in batches. Every image is decoded "
                    "first: unreadable files are all named in one error and nothing is written. Existing outputs "
                    "are never replaced without --overwrite, --out may not lie in a training data folder (one with "
                    "images/ and masks/), and one predict at a time writes into a folder.",
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint of this recipe (RUN/best.pt or last.pt)")
    parser.add_argument("--images", required=True, help="folder of .png/.jpg/.tif images")
    parser.add_argument("--out", required=True, help="folder for <id>_prob.png and <id>_mask.png")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace output files that --out holds already (default: refuse, naming the first, "
                             "before anything is written)")
    parser.add_argument("--threshold", type=fraction, default=0.5, help="probability of foreground (default: 0.5)")
    parser.add_argument("--device", type=device_option, default="auto",
                        help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    add_prediction_options(parser)
    return parser


BUILTIN_CLASSES = ["nucleus"]


def load_data(config: dict[str, Any]) -> tuple[Dataset, Dataset, list[str]]:
    """Training and validation sets and the names of the mask classes (the class folders, in
    order; ``mask`` for masks directly in masks/); bad data is a UsageError."""
    if config["data"] is None:
        size = config["image_size"]
        train = SyntheticNuclei(config["train_samples"], image_size=size, seed=config["seed"])
        val = SyntheticNuclei(config["val_samples"], image_size=size, seed=config["seed"] + 10_000)
        # Generated once into memory: each epoch then reads plain tensors.
        return materialize(train), materialize(val), list(BUILTIN_CLASSES)
    try:
        train, val = split_segmentation(config["data"], val_fraction=config["val_fraction"], seed=config["seed"],
                                        image_size=config["image_size"])
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    image, mask = train[0]
    if image.shape[-1] % SIDE_MULTIPLE or image.shape[-2] % SIDE_MULTIPLE:
        raise UsageError(
            f"images of {config['data']!r} are {image.shape[-2]}x{image.shape[-1]}; the U-Nets need sides that are "
            f"multiples of {SIDE_MULTIPLE}: pass --image-size (e.g. {nearest_multiple(image.shape[-1])})"
        )
    return train, val, list(train.classes)


def materialize(dataset: Dataset) -> TensorDataset:
    """Stack a small map-style dataset of (image, mask) pairs into tensors."""
    images, masks = zip(*(dataset[i] for i in range(len(dataset))))
    return TensorDataset(torch.stack(images), torch.stack(masks))


def build_model(config: dict[str, Any], num_classes: int) -> nn.Module:
    """The configured network."""
    if config["arch"] == "NestedUNet":
        return NestedUNet(num_classes=num_classes, input_channels=3, deep_supervision=config["deep_supervision"])
    return UNet(num_classes=num_classes, input_channels=3)


def build_optimizer(config: dict[str, Any], model: nn.Module,
                    device: torch.device | None = None) -> tuple[torch.optim.Optimizer, Any]:
    """Optimizer and learning-rate scheduler of the configuration. On CUDA the optimizer is the
    fused kernel, which also lets a grad scaler skip steps without waiting on the device."""
    fused = {"fused": True} if device is not None and device.type == "cuda" else {}
    if config["optimizer"] == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"],
                                     **fused)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9, nesterov=True,
                                    weight_decay=config["weight_decay"], **fused)
    if config["scheduler"] == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config["epochs"],
                                                               eta_min=config["lr"] * 0.01)
    elif config["scheduler"] == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=2)
    else:
        scheduler = None
    return optimizer, scheduler


def validate_config(config: dict[str, Any]) -> None:
    """Checks that need no data: option combinations."""
    if config["deep_supervision"] and config["arch"] != "NestedUNet":
        raise UsageError("--deep-supervision needs --arch NestedUNet")
    if config["image_size"] is not None and config["image_size"] % SIDE_MULTIPLE:
        raise UsageError(f"--image-size {config['image_size']} is not a multiple of {SIDE_MULTIPLE}; try "
                         f"{nearest_multiple(config['image_size'])}")


class NestedUNetRecipe(Recipe):
    """Nuclei segmentation: NestedUNet (or UNet) with BCE + Dice, Adam or SGD, cosine schedule."""

    name = "nested_unet"
    monitor, mode, monitor_label = "val_iou", "max", "IoU"
    config_keys = ("data", "arch", "deep_supervision", "epochs", "batch_size", "lr", "weight_decay", "optimizer",
                   "scheduler", "image_size", "val_fraction", "train_samples", "val_samples", "workers", "device",
                   "precision", "channels_last", "seed")
    build_parser = staticmethod(build_parser)

    def new_config(self, args: argparse.Namespace) -> dict[str, Any]:
        ignored = ("train_samples", "val_samples") if args.data is not None else ("val_fraction", "workers")
        refused = [self.given[dest] for dest in ignored if dest in self.given]
        if refused:
            source = f"--data {args.data}" if args.data is not None else "the built-in data (no --data)"
            raise UsageError(f"{' and '.join(refused)} {'has' if len(refused) == 1 else 'have'} no effect with "
                             f"{source}; leave {'it' if len(refused) == 1 else 'them'} out (--train-samples and "
                             "--val-samples size the built-in data; --val-fraction and --workers apply to --data)")
        config = super().new_config(args)
        if config["data"] is None and config["image_size"] is None:
            config["image_size"] = BUILTIN_IMAGE_SIZE
        return config

    def build(self, config: dict[str, Any], device: torch.device) -> RecipeParts:
        validate_config(config)
        train_set, val_set, classes = load_data(config)
        if config["data"] is not None:  # a resumed run must see the files it started on
            files = data_files(config["data"], {*train_set.layout.files(), *val_set.layout.files()})
            check_same_data(config.setdefault("data_files", files), files, config["data"], "--data")
        if config.setdefault("classes", classes) != classes:
            raise UsageError(f"the run was trained on the classes {config['classes']}, but {config['data']} now "
                             f"has {classes}")
        model = build_model(config, len(classes))
        optimizer, scheduler = build_optimizer(config, model, device)
        workers = config["workers"] if config["data"] is not None else 0
        pin = device.type == "cuda"
        # The order of each epoch, and each sample's augmentation, depend on the seed, the epoch and
        # the sample alone: a run resumed inside an epoch starts at its next batch and draws what the
        # uninterrupted run drew, with any number of workers. Workers leave stop signals to this process.
        train_loader = DataLoader(train_set, batch_size=config["batch_size"],
                                  sampler=ResumableSampler(train_set, seed=config["seed"]), num_workers=workers,
                                  drop_last=len(train_set) > config["batch_size"], pin_memory=pin,
                                  worker_init_fn=ignore_stop_signals)
        val_loader = DataLoader(val_set, batch_size=config["batch_size"], num_workers=workers, pin_memory=pin,
                                worker_init_fn=ignore_stop_signals)
        fixed = next(iter(DataLoader(val_set, batch_size=8)))
        metrics = {"iou": iou, "dice": dice}
        if len(classes) > 1:  # each class's IoU as its own scalar, named after its folder
            metrics.update({f"iou_{name}": class_iou(index) for index, name in enumerate(classes)})
        return RecipeParts(model=model, loss_fn=DeepSupervisionLoss(BCEDiceLoss()), optimizer=optimizer,
                           train_loader=train_loader, val_loader=val_loader, metrics=metrics,
                           example=fixed[0][:1].expand(config["batch_size"], -1, -1, -1).contiguous(),
                           scheduler=scheduler, extras={"fixed": fixed})

    def callbacks(self, run_dir: Path, config: dict[str, Any], parts: RecipeParts) -> list[Callback]:
        fixed, classes = parts.extras["fixed"], config["classes"]
        # The tag scheme of trainer.callbacks.tags: `Loss/training loss` every 10 steps, `Loss/...` and
        # `Validation/...` per epoch; the metrics get their usual names.
        tags = {"val_iou": "Validation/IoU", "val_dice": "Validation/Dice"}
        if len(classes) > 1:
            tags.update({f"val_iou_{name}": f"Validation/IoU/{name}" for name in classes})
        return [
            TensorBoardCallback(run_dir, every_n_steps=10, tags=tags, monitor="val_iou", mode="max",
                                hparams={key: value for key, value in config.items() if key != "data_files"}),
            ImageGridCallback(run_dir, batch=fixed, num_images=8, nrow=4, classes=classes, stretch=True),
            GraphCallback(run_dir, example=fixed[0][:2]),
            PredictionFigureCallback(run_dir, kind="segmentation", batch=fixed, num_images=4, classes=classes,
                                     stretch=True),
            ProgressBar(every_n_steps=5),
        ]


def train(argv: list[str] | None) -> int:
    """Train (or resume) a run; returns the exit code."""
    return NestedUNetRecipe().train(argv)


def load_trained_model(checkpoint: str | os.PathLike,
                       device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The trained network of a checkpoint of this recipe and the run's configuration.

    The network has the checkpoint's weights, sits on `device` in eval mode, and is channels-last
    if the run trained so. Its configuration holds ``image_size`` (None: trained at the images'
    own resolution), ``classes``, ``precision`` and the other options of the run. A missing or
    unreadable file, or one that is not a checkpoint of this recipe, is a `UsageError`.

    Args:
        checkpoint: ``RUN/best.pt`` or ``RUN/last.pt`` of a run of this recipe.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a `torch.device`.
    """
    try:
        state = load_checkpoint(checkpoint)
        device = resolve_device(device)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    config = state.get("config")
    check_recipe_config(config, ("arch", "deep_supervision"), checkpoint, NestedUNetRecipe.name)
    if not config.get("classes"):
        raise UsageError(f"{str(checkpoint)!r} records no mask classes; it was written by an older version of this "
                         "recipe: train it again with this one")
    model = build_model(config, num_classes=len(config["classes"]))
    check_weights(model, state, checkpoint)
    model.load_state_dict(state["model"])
    model.to(device).eval()
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
        raise UsageError(f"--out {args.out!r} lies in the training data folder {str(data)!r} (it holds images/ and "
                         "masks/): predictions there would mix with, or replace, its images and masks; choose a "
                         "folder outside it")
    if out.is_dir() and not os.access(out, os.W_OK):
        raise UsageError(f"--out {args.out!r} is not writable")
    model, config = load_trained_model(args.checkpoint, args.device)
    files = check_images(args.images)
    check_outputs(out, files, config["classes"], args.overwrite)

    if args.image_size is not None:
        image_size, scale = args.image_size, f"every image resized to {args.image_size}x{args.image_size} (--image-size)"
    elif args.scale == "native" or config["image_size"] is None:
        image_size, scale = None, "each image at its own resolution"
        scale += " (--scale native)" if config["image_size"] is not None else ", as the run trained"
    else:
        image_size = config["image_size"]
        scale = (f"every image resized to {image_size}x{image_size}, as the run trained (--scale native: each "
                 f"image at its own resolution)")
    device = next(model.parameters()).device
    precision, reason = inference_precision(config, device)
    channels_last = config.get("channels_last") is True
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create --out {args.out!r}: {exc.strerror or exc}") from None
    with lock_run_dir(out, f"--out {args.out!r}"):
        check_outputs(out, files, config["classes"], args.overwrite)  # again: another command may have written
        print(f"scale: {scale}; precision: {reason}{', channels-last' if channels_last else ''}; "
              f"tiles up to {args.tile}x{args.tile}, overlap {args.overlap}", flush=True)
        predict_folder(model, files, out, config["classes"], image_size, tile=args.tile, overlap=args.overlap,
                       precision=precision, channels_last=channels_last, threshold=args.threshold)
    print(f"wrote {len(files)} probability maps and masks to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m recipes.nested_unet [predict] ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "predict":
        return predict(argv[1:])
    return train(argv)


if __name__ == "__main__":
    sys.exit(run_cli(main))
