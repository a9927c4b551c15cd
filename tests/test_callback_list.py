"""`trainer.callback.CallbackList`: dispatch only where a callback acts, state keys, `describe`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer import Trainer
from trainer.callbacks import EarlyStopping, ModelCheckpoint


def make_trainer(callbacks, epochs=1, **kwargs):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    return Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        nn.MSELoss(),
        callbacks=callbacks,
        max_epochs=epochs,
        device="cpu",
        **kwargs,
    )


def hook_table(trainer):
    return {line.split()[0]: " ".join(line.split()[1:]) for line in trainer.describe().splitlines()}


def test_model_checkpoint_is_dispatched_per_batch_only_with_step_checkpoints(tmp_path):
    epoch_only = hook_table(make_trainer([ModelCheckpoint(tmp_path)]))
    assert epoch_only["on_batch_end"] == "-" and epoch_only["on_epoch_end"] == "ModelCheckpoint"
    stepping = hook_table(make_trainer([ModelCheckpoint(tmp_path, every_n_steps=2)]))
    assert stepping["on_batch_end"] == "ModelCheckpoint"
    validating = hook_table(make_trainer([ModelCheckpoint(tmp_path)], val_every_n_steps=2))
    assert validating["on_batch_end"] == "ModelCheckpoint"


def test_two_stateful_callbacks_with_one_state_key_are_refused(tmp_path):
    with pytest.raises(ValueError, match="'ModelCheckpoint'.*state_key"):
        make_trainer([ModelCheckpoint(tmp_path / "a"), ModelCheckpoint(tmp_path / "b")])
    second = ModelCheckpoint(tmp_path / "b", monitor="loss")
    second.state_key = "by_train_loss"
    trainer = make_trainer([ModelCheckpoint(tmp_path / "a", monitor="loss"), second])
    assert sorted(trainer.stateful_callbacks()) == ["ModelCheckpoint", "by_train_loss"]


def test_each_callback_gets_its_own_state_back_and_unknown_saved_state_warns(tmp_path, regression_loaders):
    by_loss = ModelCheckpoint(tmp_path / "b", monitor="loss")
    by_loss.state_key = "by_train_loss"
    make_trainer([ModelCheckpoint(tmp_path / "a"), by_loss, EarlyStopping()], epochs=2).fit(*regression_loaders)

    restored = ModelCheckpoint(tmp_path / "b2", monitor="loss")
    restored.state_key = "by_train_loss"
    trainer = make_trainer([restored], epochs=3)
    with pytest.warns(RuntimeWarning, match="EarlyStopping, ModelCheckpoint"):
        trainer.fit(regression_loaders[0], regression_loaders[1], resume_from=tmp_path / "a" / "last.pt")
    assert restored.best_epoch is not None and restored.best <= by_loss.best
