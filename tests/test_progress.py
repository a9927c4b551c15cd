"""`trainer.callbacks.progress`: ProgressBar."""

from __future__ import annotations

import io
import re

import pytest
import torch
from torch import nn

from tests.helpers import fit_with, make
from trainer import Callback, TimeLimitReached, Trainer
from trainer.callbacks import (
    ModelCheckpoint,
    ProgressBar,
    TensorBoardCallback,
)


def test_progress_bar_shows_running_loss_and_epoch_logs(regression_loaders):
    out = io.StringIO()
    _, history = fit_with([ProgressBar(every_n_steps=1, file=out)], regression_loaders, max_epochs=2)
    text = out.getvalue()
    assert "epoch 1/2" in text and "epoch 2/2" in text
    assert f"val_loss={history[-1]['val_loss']:.4f}" in text
    assert "3/3" in text  # the bar completes at epoch end


def test_progress_bar_rejects_bad_every_n_steps():
    with pytest.raises(ValueError, match="every_n_steps"):
        ProgressBar(every_n_steps=0)


def test_progress_bar_counts_optimizer_steps_like_tensorboard(regression_loaders):
    # 3 batches per epoch, 2 per optimizer step: the first step ends batch 2, where the bar moves; the
    # shorter last window steps at the epoch's end, where the bar completes.
    shown, out = [], io.StringIO()

    class Spy(ProgressBar):
        def on_batch_end(self, trainer, batch, outputs):
            super().on_batch_end(trainer, batch, outputs)
            shown.append(int(re.findall(r"\| (\d+)/3 \[", out.getvalue())[-1]))  # the count drawn last

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        nn.MSELoss(),
        accumulate_grad_batches=2,
        callbacks=[Spy(every_n_steps=1, file=out)],
        device="cpu",
    ).fit(regression_loaders[0])
    assert shown == [0, 2, 2]
    assert re.findall(r"\| (\d+)/3 \[", out.getvalue())[-1] == "3"


def test_progress_bar_and_tensorboard_take_the_former_log_every_with_a_deprecation_warning(tmp_path):
    with pytest.deprecated_call(match="every_n_steps=5"):
        assert ProgressBar(log_every=5).every_n_steps == 5
    with pytest.deprecated_call(match="every_n_steps=7"):
        assert TensorBoardCallback(tmp_path, log_every=7).every_n_steps == 7


def test_progress_bar_of_a_resumed_epoch_starts_at_its_batch(tmp_path):
    class Stop(Callback):
        order = 200

        def on_batch_end(self, trainer, batch, outputs):
            if trainer.global_step == 4:
                raise TimeLimitReached("stop")

    trainer, train, val = make([ModelCheckpoint(tmp_path), Stop()], epochs=1)
    with pytest.raises(TimeLimitReached):
        trainer.fit(train, val)
    out = io.StringIO()
    trainer, train, val = make([ModelCheckpoint(tmp_path), ProgressBar(every_n_steps=2, file=out)], epochs=1)
    trainer.fit(train, val, resume_from=tmp_path / "last.pt")
    assert " 4/10 [" in out.getvalue() and "10/10" in out.getvalue()
