"""The PyTorch TensorBoard tutorial as a recipe: the small CNN on Fashion-MNIST.

    python -m recipes.fashion_mnist --data-dir ./data            # files already in ./data/FashionMNIST/raw
    python -m recipes.fashion_mnist --download                    # fetch them first (needs internet)
    python -m recipes.fashion_mnist --resume runs/fashion_mnist/20261127-101500

Logs the tutorial's TensorBoard tags (`four_fashion_mnist_images`, the graph, `training loss`
every --log-every batches, as `Loss/training loss`, `predictions vs. actuals`), plus the epoch's training and validation
loss (`Loss/...`) and validation accuracy (`Validation/accuracy`) on the test split, per-class
precision-recall curves and an embedding projector view.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from models import FashionCNN, accuracy
from recipes.cli import RecipeArgumentParser, add_run_options, run_cli
from recipes.common import Recipe
from recipes.config import PATH, PER_COMMAND, RunConfig
from recipes.errors import UsageError
from recipes.option_types import non_negative_float, non_negative_int, positive_float, positive_int
from recipes.parts import RecipeParts
from trainer import Callback, ResumableSampler, Trainer, ignore_stop_signals
from trainer.callbacks import (
    EmbeddingCallback,
    GraphCallback,
    ImageGridCallback,
    PRCurveCallback,
    PredictionFigureCallback,
    ProgressBar,
    TensorBoardCallback,
)
from trainer.distributed import is_rank_zero
from trainer_datasets import CLASSES, DatasetError, TensorBatchLoader, load_fashion_mnist

__all__ = ["FashionMNIST", "main"]


RUNS_ROOT = "runs/fashion_mnist"
MEAN, STD = 0.5, 0.5  # the tutorial's Normalize((0.5,), (0.5,))


def build_parser() -> argparse.ArgumentParser:
    """The recipe's options."""
    parser = RecipeArgumentParser(
        prog="python -m recipes.fashion_mnist",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--epochs", type=positive_int, default=2, help="training epochs (default: %(default)s)")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=4,
        help="samples per step; the tutorial's is 4 (default: %(default)s)",
    )
    parser.add_argument("--lr", type=positive_float, default=0.001, help="SGD learning rate (default: %(default)s)")
    parser.add_argument("--momentum", type=non_negative_float, default=0.9, help="SGD momentum (default: %(default)s)")
    parser.add_argument(
        "--log-every",
        type=positive_int,
        default=1000,
        help="batches between running-loss points and prediction figures (default: %(default)s)",
    )
    parser.add_argument(
        "--data-dir",
        default="./data",
        help="folder holding FashionMNIST/raw/ with the IDX files (default: %(default)s)",
    )
    parser.add_argument("--download", action="store_true", help="download Fashion-MNIST into --data-dir if missing")
    parser.add_argument(
        "--workers",
        type=non_negative_int,
        default=0,
        help="0: batches cut from the decoded tensor in this process (fastest); N: a DataLoader "
        "with N worker processes over the same tensor (default: %(default)s)",
    )
    add_run_options(parser, RUNS_ROOT)
    return parser


def normalize_batch(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate uint8 (1, 28, 28) images into a normalised float batch (for --workers > 0)."""
    images, labels = zip(*samples)
    return (torch.stack(images).float() / 255.0 - MEAN) / STD, torch.stack(labels)


def make_loader(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    shuffle: bool,
    config: FashionMNISTConfig,
    pin_memory: bool,
) -> Any:
    """Batches of (normalised images, labels): in-process, or from worker processes."""
    if config.workers == 0:
        return TensorBatchLoader(
            images, labels, batch_size, shuffle=shuffle, seed=config.seed, mean=MEAN, std=STD, pin_memory=pin_memory
        )
    dataset = TensorDataset(images.unsqueeze(1), labels)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ResumableSampler(dataset, shuffle, config.seed),
        num_workers=config.workers,
        collate_fn=normalize_batch,
        pin_memory=pin_memory,
        worker_init_fn=ignore_stop_signals,
    )  # not persistent: see ignore_stop_signals


def normalized(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) images as the model sees them: float (N, 1, 28, 28), normalised."""
    return (images.unsqueeze(1).float() / 255.0 - MEAN) / STD


def tutorial_callbacks(
    run_dir: Path,
    log_every: int,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    hparams: dict[str, Any] | None = None,
) -> list[Callback]:
    """The callbacks that log the tutorial's tags: the running `training loss` every `log_every`
    steps, as ``Loss/training loss`` (and the epoch values of `trainer.callbacks.tags`),
    `four_fashion_mnist_images`, the graph and `predictions vs. actuals` (on four test images,
    every `log_every` steps)."""
    shown = (normalized(test_images[:4]), test_labels[:4])
    return [
        TensorBoardCallback(
            run_dir,
            every_n_steps=log_every,
            tags={"val_acc": "Validation/accuracy"},
            hparams=hparams,
            monitor="val_acc",
            mode="max",
        ),
        ImageGridCallback(
            run_dir,
            batch=(normalized(train_images[:4]), train_labels[:4]),
            num_images=4,
            mean=MEAN,
            std=STD,
            nrow=4,
            tag="four_fashion_mnist_images",
        ),
        GraphCallback(run_dir, example=shown[0][:1]),
        PredictionFigureCallback(
            run_dir, kind="classification", batch=shown, every_n_steps=log_every, classes=CLASSES, mean=MEAN, std=STD
        ),
    ]


@dataclass(kw_only=True, eq=False)
class FashionMNISTConfig(RunConfig):
    """A run of this recipe: the options of `build_parser` (each field is the option of its name).

    Attributes:
        batch_size: samples per step.
        lr: SGD learning rate.
        momentum: SGD momentum.
        log_every: batches between running-loss points and prediction figures.
        data_dir: the folder holding FashionMNIST/raw/.
        workers: DataLoader worker processes (0: batches cut in this process).
        download: download the data if missing (this command only; not saved).
    """

    batch_size: int
    lr: float
    momentum: float
    log_every: int
    data_dir: str = field(metadata=PATH)
    workers: int
    download: bool = field(default=False, metadata=PER_COMMAND)


@dataclass(kw_only=True)
class TutorialParts(RecipeParts):
    """`RecipeParts` with the decoded images the tutorial's callbacks show.

    Attributes:
        train: training images (uint8, N x 28 x 28) and labels.
        test: test images and labels.
    """

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


class FashionMNIST(Recipe[FashionMNISTConfig, TutorialParts]):
    """The PyTorch TensorBoard tutorial: the small CNN on Fashion-MNIST, SGD with momentum."""

    name = "fashion_mnist"
    monitor, mode, monitor_label = "val_acc", "max", "accuracy"
    config_class = FashionMNISTConfig
    build_parser = staticmethod(build_parser)

    def build(self, config: FashionMNISTConfig, device: torch.device) -> TutorialParts:
        try:
            train_images, train_labels = load_fashion_mnist(config.data_dir, train=True, download=config.download)
            test_images, test_labels = load_fashion_mnist(config.data_dir, train=False, download=config.download)
        except (DatasetError, ValueError, OSError) as exc:
            raise UsageError(str(exc)) from None
        pin = device.type == "cuda"
        model = FashionCNN()
        return TutorialParts(
            model=model,
            loss_fn=nn.CrossEntropyLoss(),
            optimizer=torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum),
            train_loader=make_loader(train_images, train_labels, config.batch_size, True, config, pin),
            val_loader=make_loader(test_images, test_labels, 1000, False, config, pin),
            metrics={"acc": accuracy},
            train=(train_images, train_labels),
            test=(test_images, test_labels),
            data={"classes": list(CLASSES), "image_size": 28, "input_channels": 1},
        )

    def callbacks(self, run_dir: Path, config: FashionMNISTConfig, parts: TutorialParts) -> list[Callback]:
        (train_images, train_labels), (test_images, test_labels) = parts.train, parts.test
        return [
            *tutorial_callbacks(
                run_dir,
                config.log_every,
                train_images,
                train_labels,
                test_images,
                test_labels,
                hparams={**config.saved(), "optimizer": "SGD"},
            ),
            PRCurveCallback(run_dir, CLASSES),
            EmbeddingCallback(run_dir, train_images, train_labels, CLASSES, num_samples=100, seed=config.seed),
            ProgressBar(every_n_steps=min(config.log_every, 200)),
        ]

    def after_fit(self, trainer: Trainer, config: FashionMNISTConfig) -> None:
        if is_rank_zero():
            print(f"test accuracy: {trainer.history[-1]['val_acc']:.4f}")


def main(argv: list[str] | None = None) -> int:
    """Train (or resume) the tutorial CNN; returns the exit code.

    Args:
        argv: the command-line arguments (default: ``sys.argv[1:]``).
    """
    return FashionMNIST().train(argv)


if __name__ == "__main__":
    sys.exit(run_cli(main))
