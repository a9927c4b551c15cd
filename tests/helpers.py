"""Helpers shared by test files: small fits and readers used by the tests of several modules."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader

from tests.conftest import make_classification
from trainer import Callback, ResumableSampler, Trainer


#: The segmentation recipe's quickest run: a UNet of width 4 on 8 synthetic 16x16 images (2 steps an
#: epoch) and 4 for validation, one epoch, with float32 and contiguous tensors asked for (so no
#: precision measurement runs). Tests change what they need with `tiny_args`.
TINY_RUN: dict[str, str] = {
    "arch": "UNet",
    "base-filters": "4",
    "train-samples": "8",
    "val-samples": "4",
    "image-size": "16",
    "batch-size": "4",
    "epochs": "1",
    "precision": "32",
    "channels-last": "off",
}


def tiny_args(**changes: object) -> list[str]:
    """`TINY_RUN` as command-line arguments of ``python -m recipes.nested_unet``, with `changes`
    (``epochs=3``, ``log_dir=path``: an underscore stands for a dash; None leaves an option out)."""
    options = {**TINY_RUN, **{name.replace("_", "-"): value for name, value in changes.items()}}
    return [arg for name, value in options.items() if value is not None for arg in (f"--{name}", str(value))]


def fit_with(callbacks, loaders, max_epochs=10):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        nn.MSELoss(),
        callbacks=callbacks,
        max_epochs=max_epochs,
        device="cpu",
    )
    return trainer, trainer.fit(*loaders)


def accuracy(p, t):
    return (p.argmax(1) == t).float().mean()


def make(callbacks=(), epochs=2, n=40, scheduler=None, **options):
    """A small classifier on `n` samples, batches of 4 (10 per epoch for 40 samples)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = scheduler(optimizer) if scheduler else None
    data = make_classification(n)
    trainer = Trainer(
        model,
        optimizer,
        nn.CrossEntropyLoss(),
        callbacks=callbacks,
        max_epochs=epochs,
        device="cpu",
        metrics={"acc": accuracy},
        scheduler=scheduler,
        **options,
    )
    train = DataLoader(data, batch_size=4, sampler=ResumableSampler(data, seed=1))
    return trainer, train, DataLoader(data, batch_size=8)


def read(run_dir):
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


class Validations(Callback):
    """Records (global step, in_step_validation, val_loss) of every validation."""

    def __init__(self):
        self.seen = []

    def on_validation_end(self, trainer, logs):
        self.seen.append((trainer.global_step, trainer.in_step_validation, logs["val_loss"]))


def write_png(tensor: torch.Tensor, path: str) -> None:
    """A uint8 (C, H, W) tensor, C = 1 or 3, saved as a PNG by Pillow."""
    array = tensor.permute(1, 2, 0).numpy()
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(path)


def write_sample(root: Path, sample_id: str, size=(16, 16), classes=None, value=255, ext="png", seed=0):
    """One random RGB image and a binary mask (per class folder in `classes`, or flat)."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    mask = (torch.rand(1, h, w, generator=g) > 0.5).to(torch.uint8) * value
    (root / "images").mkdir(parents=True, exist_ok=True)
    if ext == "png":
        write_png(image, str(root / "images" / f"{sample_id}.png"))
    else:
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / "images" / f"{sample_id}.{ext}")
    for folder in [root / "masks" / c for c in classes] if classes else [root / "masks"]:
        folder.mkdir(parents=True, exist_ok=True)
        write_png(mask, str(folder / f"{sample_id}.png"))
    return image, mask


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
