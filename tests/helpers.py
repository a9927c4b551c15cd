"""Helpers shared by test files: small fits and readers used by the tests of several modules."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from unittest import mock

import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import make_classification
from trainer import Callback, ResumableSampler, Trainer
from trainer.callbacks import ModelCheckpoint

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


def make_trainer(model, callbacks=(), **kwargs):
    """A `Trainer` of `model` with SGD (lr 0.05) and the MSE loss, on the CPU, 2 epochs unless told."""
    kwargs.setdefault("max_epochs", 2)
    kwargs.setdefault("device", "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return Trainer(model, opt, nn.MSELoss(), callbacks=callbacks, **kwargs)


def one_update(model_seed, batches, **kwargs):
    """A `nn.Linear(3, 1)` seeded with `model_seed`, trained one epoch on `batches` with SGD (lr 0.1);
    the model and its trainer."""
    torch.manual_seed(model_seed)
    model = nn.Linear(3, 1)
    trainer = Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), max_epochs=1, device="cpu", **kwargs
    )
    trainer.fit(batches)
    return model, trainer


def undocumented_options(parser: argparse.ArgumentParser) -> list[str]:
    """The options that `parser`'s ``--help`` lists without a description."""
    lines = parser.format_help().splitlines()
    missing = []
    for line, following in zip(lines, [*lines[1:], ""]):
        option = re.fullmatch(r"  (-\S.*?)(?: {2,}\S.*)?", line)
        described_below = re.match(r" {3,}\S", following)
        if option and not re.search(r" {2,}\S", line.strip()) and not described_below:
            missing.append(option.group(1))
    return missing


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


class CrashAfter(Callback):
    """Raises at the end of epoch `epochs`, after the checkpoint (order 100) was written."""

    order = 200

    def __init__(self, epochs):
        self.epochs = epochs

    def on_epoch_end(self, trainer, logs):
        if trainer.epoch + 1 == self.epochs:
            raise RuntimeError("killed")


def scheduled_run(tmp_path, epochs, schedule, callbacks=(), resume=False, crash_after=None, **options):
    """`make`'s classifier under ``schedule(optimizer)``, with `ModelCheckpoint` in `tmp_path`: a
    fit from the start, killed after epoch `crash_after`, or resumed from `tmp_path`'s last.pt; the trainer."""
    crash = [CrashAfter(crash_after)] if crash_after else []
    callbacks = [*callbacks, ModelCheckpoint(tmp_path, monitor=None), *crash]
    trainer, train, _ = make(callbacks, epochs=epochs, scheduler=schedule, **options)
    try:
        trainer.fit(train, resume_from=tmp_path / "last.pt" if resume else None)
    except RuntimeError:
        pass
    return trainer


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


class TinyNet(nn.Module):
    """A classifier of 1x8x8 images with named layers."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class TinySegNet(nn.Module):
    """Returns two outputs, like a deep-supervision network."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 1, 1)
        self.aux = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        h = torch.relu(self.encoder(x))
        return [self.aux(h), self.head(h)]


def image_data(n=24, seed=0):
    """Learnable 1x8x8 images of 3 classes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.3
    x[:, 0, 0, :] += y[:, None].float()  # learnable
    return TensorDataset(x, y)


def seg_data(n=8, seed=0):
    """3x16x16 images whose bright pixels are the mask."""
    g = torch.Generator().manual_seed(seed)
    masks = (torch.rand(n, 1, 16, 16, generator=g) > 0.6).float()
    images = masks.expand(-1, 3, -1, -1) * 0.8 + 0.1 * torch.rand(n, 3, 16, 16, generator=g)
    return TensorDataset(images, masks)


def fit_visuals(callbacks, epochs=2, batch_size=4, model=None, data=None, loss=None, metrics=None):
    """`callbacks` on a fit of `TinyNet` (or `model`) on `image_data` (or `data`), validated on the
    same data: the run the TensorBoard callbacks' tests log."""
    torch.manual_seed(0)
    model = model or TinyNet()
    data = data or image_data()
    train = DataLoader(data, batch_size=batch_size)
    val = DataLoader(data, batch_size=batch_size * 2)
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        loss or nn.CrossEntropyLoss(),
        callbacks=callbacks,
        max_epochs=epochs,
        device="cpu",
        metrics=metrics if metrics is not None else {"acc": accuracy},
    )
    return trainer, trainer.fit(train, val)


def fit_segmentation_visuals(callbacks, epochs=2, data=None):
    """`callbacks` on a fit of `TinySegNet` on `seg_data` (or `data`): the run the segmentation
    visuals' tests log."""
    return fit_visuals(
        callbacks,
        epochs=epochs,
        model=TinySegNet(),
        data=data if data is not None else seg_data(),
        loss=lambda p, t: nn.functional.binary_cross_entropy_with_logits(p[-1], t),
        metrics={},
    )


def read_logged(run_dir):
    """Every scalar, image and tensor event of `run_dir`, as TensorBoard reads them."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


class HostSyncError(AssertionError):
    """An operation that waits on the device ran under `HostSyncGuard`."""


class HostSyncGuard:
    """Fails every tensor operation that, on CUDA, makes the host wait for the device: reading a
    value (``item``, ``tolist``, ``bool``, ``int``, ``float``, an index), copying to the host
    (``cpu``, ``numpy``), and those whose output size depends on the data (``nonzero``,
    ``masked_select``, ``unique``, ``bincount``, which reads the largest value even with
    ``minlength``, and indexing with a boolean mask). The same code path on the CPU, checked
    where no GPU is (on CUDA, ``torch.cuda.set_sync_debug_mode("error")`` is the real check).
    `start` and `stop` it (from callbacks), or use it as a context manager."""

    TENSOR_METHODS = (
        "item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy",
        "nonzero", "masked_select", "unique", "bincount",
    )  # fmt: skip
    FUNCTIONS = ("nonzero", "masked_select", "unique", "bincount")

    def __init__(self) -> None:
        getitem = torch.Tensor.__getitem__

        def guarded_getitem(tensor, index):
            indices = index if isinstance(index, tuple) else (index,)
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
                raise HostSyncError("indexing with a boolean mask waits on the device")
            return getitem(tensor, index)

        self._patches = [mock.patch.object(torch.Tensor, "__getitem__", guarded_getitem)]
        for owner, names in ((torch.Tensor, self.TENSOR_METHODS), (torch, self.FUNCTIONS)):
            for name in names:
                self._patches.append(mock.patch.object(owner, name, _refuse(f"{owner.__name__}.{name}")))
        self.active = False

    def start(self) -> None:
        for patch in self._patches:
            patch.start()
        self.active = True

    def stop(self) -> None:
        if self.active:
            for patch in reversed(self._patches):
                patch.stop()
            self.active = False

    def __enter__(self) -> HostSyncGuard:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _refuse(name: str):
    def refused(*args, **kwargs):
        raise HostSyncError(f"{name} waits on the device")

    return refused
