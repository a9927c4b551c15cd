"""`trainer.scheduling`: when the learning-rate scheduler steps, for every kind of scheduler."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from tests.helpers import Validations, make
from trainer import Callback, Trainer, TrainingInterrupted
from trainer.callbacks import ModelCheckpoint


def test_epoch_scheduler_and_logged_lr(linear_model, regression_loaders):
    opt = torch.optim.SGD(linear_model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    trainer = Trainer(linear_model, opt, nn.MSELoss(), max_epochs=3, device="cpu", scheduler=sched)
    history = trainer.fit(regression_loaders[0])
    assert [h["lr"] for h in history] == [0.5, 0.25, 0.125]


def test_step_scheduler(linear_model, regression_loaders):
    opt = torch.optim.SGD(linear_model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    trainer = Trainer(
        linear_model, opt, nn.MSELoss(), max_epochs=1, device="cpu", scheduler=sched, scheduler_interval="step"
    )
    history = trainer.fit(regression_loaders[0])
    assert history[0]["lr"] == 0.5**3


def test_plateau_scheduler_is_fed_val_loss(linear_model, regression_loaders, mocker):
    opt = torch.optim.SGD(linear_model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    spy = mocker.spy(sched, "step")
    trainer = Trainer(linear_model, opt, nn.MSELoss(), max_epochs=2, device="cpu", scheduler=sched)
    history = trainer.fit(*regression_loaders)
    assert [c.args[0] for c in spy.call_args_list] == [h["val_loss"] for h in history]


def test_plateau_scheduler_steps_after_each_validation(mocker):
    trainer, train, val = make(
        epochs=2, val_every_n_steps=4, scheduler=lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0)
    )
    seen = Validations()
    trainer.add_callback(seen)
    spy = mocker.spy(trainer.scheduler, "step")
    trainer.fit(train, val)
    assert [call.args[0] for call in spy.call_args_list] == [loss for _, _, loss in seen.seen]
    assert [step for step, _, _ in seen.seen] == [4, 8, 10, 12, 16, 20]


def test_a_run_stopped_in_its_first_validation_resumes_without_a_scheduler_warning(tmp_path):
    """torch warns when a scheduler steps before the optimizer did in this process: true in a new
    run, false in one resumed after its optimizer stepped. Stopped during epoch 1's validation and
    resumed, the run validates epoch 1 again and its scheduler steps first, without a warning, to
    the rates of an uninterrupted run."""

    class StopInFirstValidation(Callback):
        def on_validation_batch_end(self, trainer, batch, outputs):
            if trainer.epoch == 0:
                raise TrainingInterrupted("stopped during validation")

    def run(run_dir, callbacks=(), resume=False):
        def schedule(optimizer):
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

        trainer, train, val = make([ModelCheckpoint(run_dir), *callbacks], epochs=2, scheduler=schedule)
        return trainer.fit(train, val, resume_from=run_dir / "last.pt" if resume else None)

    with pytest.raises(TrainingInterrupted):
        run(tmp_path / "run", [StopInFirstValidation()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = run(tmp_path / "run", resume=True)
    assert [logs["lr"] for logs in resumed] == [logs["lr"] for logs in run(tmp_path / "whole")] == [0.05, 0.025]
