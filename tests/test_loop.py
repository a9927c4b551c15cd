"""`trainer.loop`: validation every n steps instead of (or besides) the epoch end, and what decides after each."""

from __future__ import annotations

import multiprocessing

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from tests.conftest import make_classification
from tests.helpers import Validations, make, read
from trainer import BatchLoadError, Callback, ResumableSampler, Trainer, ignore_stop_signals
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


# ------------------------------------------------------------------------------------------ loader errors
class FailingData(torch.utils.data.Dataset):
    """40 samples of `make_classification`; item `fail` raises as a file removed from disk would,
    until `fixed`."""

    def __init__(self, fail: int) -> None:
        self.data, self.fail, self.fixed = make_classification(40), fail, False

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        if index == self.fail and not self.fixed:
            raise FileNotFoundError(f"cannot read sample {index}.png: No such file or directory")
        return self.data[index]


@pytest.fixture
def workers_killed_after():
    """Kills worker processes a failing test left behind: they ignore SIGTERM, and Python's exit
    would wait for them forever (what these tests check does not happen)."""
    yield
    for child in multiprocessing.active_children():
        child.kill()


def classifier_fit(run_dir, data, workers=0, callbacks=(), resume=False):
    """A small classifier on `data` (10 batches of 4 in their order), with step checkpoints off."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    loader = DataLoader(
        data,
        batch_size=4,
        sampler=ResumableSampler(data, shuffle=False),
        num_workers=workers,
        worker_init_fn=ignore_stop_signals if workers else None,
    )
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        nn.CrossEntropyLoss(),
        callbacks=[ModelCheckpoint(run_dir, monitor=None), *callbacks],
        max_epochs=2,
        device="cpu",
        seed=3,
    )
    trainer.fit(loader, resume_from=run_dir / "last.pt" if resume else None)
    return trainer


def test_an_error_in_an_epoch_ends_the_loaders_workers_at_once(tmp_path, workers_killed_after):
    """Workers that ignore SIGTERM (as a signal to the process group needs) must end with the
    error: left to its traceback, Python's exit would wait for them forever."""

    class Boom(Callback):
        def on_batch_end(self, trainer, batch, outputs):
            if trainer.global_step == 2:
                raise RuntimeError("a bug in a callback")

    with pytest.raises(RuntimeError, match="a bug in a callback") as raised:
        classifier_fit(tmp_path, make_classification(40), workers=2, callbacks=[Boom()])
    assert raised.value.__traceback__ is not None and multiprocessing.active_children() == []


def test_a_batch_that_cannot_be_loaded_stops_with_the_position_before_it_saved(tmp_path, workers_killed_after):
    """Sample 21 fails (batch 6 of epoch 1, loaded by a worker): BatchLoadError names the batch and
    the worker's own message, the workers are gone, last.pt holds the position after 5 batches, and
    once the data is fixed the resumed run ends as one that never failed."""
    data = FailingData(fail=21)
    with pytest.raises(BatchLoadError) as raised:
        classifier_fit(tmp_path / "run", data, workers=2)
    assert str(raised.value) == (
        "loading training batch 6 of epoch 1 failed: "
        "FileNotFoundError: cannot read sample 21.png: No such file or directory"
    )
    assert isinstance(raised.value.__cause__, FileNotFoundError) and multiprocessing.active_children() == []
    position = load_checkpoint(tmp_path / "run" / "last.pt")["position"]
    assert (position["epoch"], position["batches"]) == (0, 5)
    data.fixed = True
    resumed = classifier_fit(tmp_path / "run", data, resume=True)
    whole = classifier_fit(tmp_path / "whole", make_classification(40))
    assert resumed.history == whole.history
    assert all(
        torch.equal(a, b) for a, b in zip(resumed.module.state_dict().values(), whole.module.state_dict().values())
    )


def test_a_validation_batch_that_cannot_be_loaded_is_named():
    trainer, train, _ = make(epochs=1)
    val = DataLoader(FailingData(fail=9), batch_size=4)
    with pytest.raises(BatchLoadError, match=r"^loading validation batch 3 failed: FileNotFoundError: cannot read"):
        trainer.fit(train, val)
