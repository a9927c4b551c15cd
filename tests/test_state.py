"""`trainer.state`: what a checkpoint holds of the trainer and how a fit continues from it: a run
that stopped stays stopped, a resumed schedule stretches to the new last epoch, a second fit goes on."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import make, make_trainer, scheduled_run
from trainer.callbacks import EarlyStopping, ModelCheckpoint


def cosine_run(tmp_path, epochs, resume=False, crash_after=None):
    def cosine(optimizer):
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=0.01)

    return scheduled_run(tmp_path, epochs, cosine, resume=resume, crash_after=crash_after, n=16).history


def test_early_stopped_run_resumed_trains_no_further_epoch(tmp_path):
    stopper = EarlyStopping("val_loss", mode="max", patience=0)  # "max" on a falling loss: stops after epoch 2
    trainer, train, val = make([stopper, ModelCheckpoint(tmp_path)], epochs=5)
    history = trainer.fit(train, val)
    assert len(history) == 2 and trainer.should_stop
    resumed, train, val = make([EarlyStopping("val_loss", mode="max", patience=0), ModelCheckpoint(tmp_path)], epochs=5)
    assert len(resumed.fit(train, val, resume_from=tmp_path / "last.pt")) == 2
    assert resumed.global_step == trainer.global_step


@pytest.mark.parametrize("done", [2, 4])
def test_cosine_schedule_resumed_with_more_epochs_decays_to_its_minimum_at_the_new_end(tmp_path, done):
    # A 4-epoch run, finished or killed after 2 epochs, resumed with 8 epochs.
    first = cosine_run(tmp_path, epochs=4, crash_after=done if done < 4 else None)
    assert len(first) == done
    history = cosine_run(tmp_path, epochs=8, resume=True)
    rates = [logs["lr"] for logs in history]
    assert len(rates) == 8 and rates[:done] == [logs["lr"] for logs in first]
    later = rates[done - 1 :]
    assert all(b <= a + 1e-12 for a, b in zip(later, later[1:])), rates  # never climbs back up
    assert rates[-1] == pytest.approx(0.01)
    if done == 2:
        assert rates[2] > 0.02  # still decaying, not jumped to the minimum


def test_fit_continues_after_done_epochs(linear_model, regression_loaders):
    trainer = make_trainer(linear_model, max_epochs=2)
    trainer.fit(regression_loaders[0])
    trainer.max_epochs = 3
    assert len(trainer.fit(regression_loaders[0])) == 3 and trainer.epoch == 2
