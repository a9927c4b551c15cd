"""EarlyStopping and ProgressBar."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from trainer import Callback, Trainer
from trainer.callbacks import EarlyStopping, ProgressBar, TensorBoardCallback


class FakeLogs(Callback):
    """Replaces the epoch's val_loss with a scripted sequence (before EarlyStopping, at order -10)."""

    order = -20

    def __init__(self, values):
        self.values = values

    def on_epoch_end(self, trainer, logs):
        logs["val_loss"] = self.values[trainer.epoch]


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


def test_early_stopping_stops_after_patience(regression_loaders):
    stopper = EarlyStopping("val_loss", patience=2)
    values = [1.0, 0.5, 0.6, 0.55, 0.7, 0.1, 0.1, 0.1, 0.1, 0.1]
    _, history = fit_with([FakeLogs(values), stopper], regression_loaders)
    assert len(history) == 4  # best at epoch 1, then two epochs without improvement
    assert stopper.best == 0.5 and stopper.best_epoch == 1 and stopper.stopped_epoch == 3


def test_early_stopping_max_mode_and_min_delta(regression_loaders):
    stopper = EarlyStopping("val_loss", mode="max", patience=1, min_delta=0.1)
    values = [0.5, 0.55, 0.9, 0.95, 0.3] + [0.0] * 5
    _, history = fit_with([FakeLogs(values), stopper], regression_loaders)
    assert len(history) == 2 and stopper.best == 0.5  # +0.05 is below min_delta


def test_early_stopping_state_round_trip(regression_loaders):
    stopper = EarlyStopping(patience=5)
    fit_with([FakeLogs([3.0, 2.0, 2.5]), stopper], regression_loaders, max_epochs=3)
    restored = EarlyStopping(patience=5)
    restored.load_state_dict(stopper.state_dict())
    assert restored.state_dict() == {"best": 2.0, "best_epoch": 1, "wait": 1, "stopped_epoch": None}


def test_early_stopping_missing_monitor_names_available_keys(regression_loaders):
    with pytest.raises(KeyError, match=r"monitors 'val_iou'.*\['loss', 'lr'\]"):
        fit_with([EarlyStopping("val_iou")], (regression_loaders[0],))


@pytest.mark.parametrize("kwargs", [{"mode": "up"}, {"patience": -1}, {"min_delta": -0.1}])
def test_early_stopping_bad_options(kwargs):
    with pytest.raises(ValueError):
        EarlyStopping(**kwargs)


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
    shown = []

    class Spy(ProgressBar):
        def on_batch_end(self, trainer, batch, outputs):
            super().on_batch_end(trainer, batch, outputs)
            shown.append(self._bar.n)

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        nn.MSELoss(),
        accumulate_grad_batches=2,
        callbacks=[Spy(every_n_steps=1, file=io.StringIO())],
        device="cpu",
    ).fit(regression_loaders[0])
    assert shown == [0, 2, 2]


def test_progress_bar_and_tensorboard_take_the_former_log_every_with_a_deprecation_warning(tmp_path):
    with pytest.deprecated_call(match="every_n_steps=5"):
        assert ProgressBar(log_every=5).every_n_steps == 5
    with pytest.deprecated_call(match="every_n_steps=7"):
        assert TensorBoardCallback(tmp_path, log_every=7).every_n_steps == 7
