"""`trainer.loop`: validation every n steps instead of (or besides) the epoch end, and what decides after each."""

from __future__ import annotations

import pytest

from tests.helpers import Validations, make, read
from trainer.callbacks import (
    EarlyStopping,
    ModelCheckpoint,
    TensorBoardCallback,
)
from trainer.checkpoint import load_checkpoint


# ------------------------------------------------------------------------------------------ step validation
def test_step_validation_runs_every_n_steps_and_is_logged_at_the_global_step(tmp_path):
    seen = Validations()
    trainer, train, val = make([seen, TensorBoardCallback(tmp_path, every_n_steps=100)], val_every_n_steps=3)
    history = trainer.fit(train, val)
    # Epochs of 10 steps: 3, 6, 9 inside epoch 1 (10 is its end), 12, 15, 18 inside epoch 2 (20 its end).
    assert [(step, inside) for step, inside, _ in seen.seen] == [
        (3, True),
        (6, True),
        (9, True),
        (10, False),
        (12, True),
        (15, True),
        (18, True),
        (20, False),
    ]
    curve = [(e.step, e.value) for e in read(tmp_path).Scalars("Loss/validation")]
    assert curve == [(step, pytest.approx(loss)) for step, _, loss in seen.seen]
    assert [logs["val_loss"] for logs in history] == [seen.seen[3][2], seen.seen[7][2]]


def test_step_validation_instead_of_the_epoch_end(tmp_path):
    seen = Validations()
    trainer, train, val = make([seen, TensorBoardCallback(tmp_path)], val_every_n_steps=5, val_at_epoch_end=False)
    history = trainer.fit(train, val)
    assert [(step, inside) for step, inside, _ in seen.seen] == [(5, True), (10, True), (15, True), (20, True)]
    assert all(set(logs) == {"loss", "lr"} for logs in history)
    assert [e.step for e in read(tmp_path).Scalars("Loss/validation")] == [5, 10, 15, 20]


def test_early_stopping_and_checkpoints_decide_after_each_validation(tmp_path):
    seen = Validations()
    stopper = EarlyStopping("val_loss", mode="max", patience=1)  # "max" on a falling loss: stops at the 3rd
    checkpoint = ModelCheckpoint(tmp_path, monitor="val_loss", mode="min")
    trainer, train, val = make([seen, stopper, checkpoint], epochs=5, val_every_n_steps=3, val_at_epoch_end=False)
    history = trainer.fit(train, val)
    assert [step for step, _, _ in seen.seen] == [3, 6]  # patience 1: the second validation stops it
    assert trainer.should_stop and len(history) == 1 and trainer.global_step == 6
    assert (stopper.best_epoch, stopper.wait) == (0, 1)
    best = load_checkpoint(checkpoint.best_path)  # the lowest validation loss: step 6, inside epoch 1
    assert best["global_step"] == 6 and best["position"]["batches"] == 6
    assert checkpoint.best == seen.seen[1][2] and checkpoint.best_step == 6


def test_a_monitor_missing_from_step_validations_is_a_clear_error():
    trainer, train, val = make([EarlyStopping("val_iou")], val_every_n_steps=2)
    with pytest.raises(KeyError, match="EarlyStopping monitors 'val_iou'"):
        trainer.fit(train, val)
