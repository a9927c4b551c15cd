"""The CUDA path: mixed precision, the automatic choice, pinned batches and no host sync per step.

These run where a GPU is (``python -m bench.gpu_check`` runs them with ``-m cuda``); without one
they are reported as skipped. Everything they cover on the CPU side is tested elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainer import Callback, Trainer
from trainer.callbacks import ModelCheckpoint, ProgressBar, TensorBoardCallback

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def conv_problem(n: int = 48):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 16, 16, generator=g)
    masks = (images.mean(1, keepdim=True) > 0.5).float()
    return TensorDataset(images, masks)


def conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 1, 1))


def make_trainer(precision: str, callbacks=(), channels_last="auto", epochs: int = 2) -> Trainer:
    model = conv_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    return Trainer(
        model,
        optimizer,
        nn.BCEWithLogitsLoss(),
        callbacks=list(callbacks),
        max_epochs=epochs,
        device="cuda",
        precision=precision,
        channels_last=channels_last,
        metrics={"acc": lambda p, t: ((p > 0) == (t > 0.5)).float().mean()},
    )


def loaders(batch_size: int = 8):
    data = conv_problem()
    return (
        DataLoader(data, batch_size=batch_size, shuffle=True, pin_memory=True),
        DataLoader(data, batch_size=16, pin_memory=True),
    )


@pytest.mark.parametrize("precision", ["32", "bf16", "16-mixed"])
def test_fit_learns_on_cuda(precision):
    trainer = make_trainer(precision, epochs=4)
    history = trainer.fit(*loaders())
    assert next(trainer.model.parameters()).device.type == "cuda"
    assert history[-1]["loss"] < history[0]["loss"]
    assert (trainer.scaler is not None) == (precision == "16-mixed")


def test_auto_precision_on_this_gpu_and_channels_last_for_convolutions(capsys):
    trainer = make_trainer("auto", epochs=1)
    trainer.fit(*loaders())
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert trainer.precision == ("bf16" if native else "16-mixed")
    assert trainer.channels_last is True
    assert trainer.module[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert "Trainer: precision:" in capsys.readouterr().out


class SyncGuard(Callback):
    """Turns CUDA's sync debug mode to "error" from the end of one step until the log-point
    callbacks of the next: loading, moving, forward, backward and optimizer step all run under it.
    Put one instance first and one last in the callback list."""

    def __init__(self, opens: bool) -> None:
        self.opens = opens
        self.guarded_steps = 0

    def on_batch_end(self, trainer, batch, outputs) -> None:
        if self.opens:  # first callback: the log points after it may sync
            torch.cuda.set_sync_debug_mode("default")
        elif trainer.batch_idx + 1 < trainer.num_batches:  # last callback: guard until the next step
            torch.cuda.set_sync_debug_mode("error")
            self.guarded_steps += 1

    def on_fit_end(self, trainer) -> None:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("precision", ["bf16", "16-mixed"])
def test_no_host_sync_between_log_points(tmp_path, precision):
    opener, closer = SyncGuard(opens=True), SyncGuard(opens=False)
    callbacks = [opener, TensorBoardCallback(tmp_path, every_n_steps=4), ProgressBar(every_n_steps=4), closer]
    trainer = make_trainer(precision, callbacks, channels_last=True, epochs=2)
    train, val = loaders(batch_size=4)
    try:
        trainer.fit(train, val)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert closer.guarded_steps == 2 * (len(train) - 1)


def test_checkpoint_resume_on_cuda(tmp_path):
    first = make_trainer("bf16", [ModelCheckpoint(tmp_path, monitor="val_loss")], epochs=1)
    first.fit(*loaders())
    resumed = make_trainer("bf16", epochs=2)
    resumed.fit(*loaders(), resume_from=tmp_path / "last.pt")
    assert len(resumed.history) == 2 and resumed.history[0] == first.history[0]
    assert all(p.device.type == "cuda" for p in resumed.module.parameters())
    state = next(iter(resumed.optimizer.state.values()))
    assert state["exp_avg"].device.type == "cuda"
