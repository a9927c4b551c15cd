"""`trainer.callbacks.early_stopping`: EarlyStopping."""

from __future__ import annotations

import pytest

from tests.helpers import fit_with
from trainer import Callback
from trainer.callbacks import EarlyStopping


class FakeLogs(Callback):
    """Replaces the epoch's val_loss with a scripted sequence (before EarlyStopping, at order -10)."""

    order = -20

    def __init__(self, values):
        self.values = values

    def on_epoch_end(self, trainer, logs):
        logs["val_loss"] = self.values[trainer.epoch]


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
