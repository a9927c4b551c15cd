"""Step validation, debug limits, the time limit, CSVLogger, HistogramCallback, save_top_k, throughput."""

from __future__ import annotations

import csv
import errno
import io
import math
import os
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader

from tests.conftest import make_classification
from trainer import Callback, ResumableSampler, TimeLimitReached, Trainer
from trainer.callbacks import (
    CSVLogger,
    EarlyStopping,
    HistogramCallback,
    ModelCheckpoint,
    ProgressBar,
    TensorBoardCallback,
)
from trainer.checkpoint import load_checkpoint
from trainer.limits import format_duration, parse_duration


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


class Validations(Callback):
    """Records (global step, in_step_validation, val_loss) of every validation."""

    def __init__(self):
        self.seen = []

    def on_validation_end(self, trainer, logs):
        self.seen.append((trainer.global_step, trainer.in_step_validation, logs["val_loss"]))


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


def test_a_monitor_missing_from_step_validations_is_a_clear_error():
    trainer, train, val = make([EarlyStopping("val_iou")], val_every_n_steps=2)
    with pytest.raises(KeyError, match="EarlyStopping monitors 'val_iou'"):
        trainer.fit(train, val)


# ------------------------------------------------------------------------------------------ debug limits
@pytest.mark.parametrize("limits, batches, val_batches", [((3, 2), 3, 2), ((0.25, 0.5), 2, 2), ((1.0, None), 10, 5)])
def test_limit_batches(limits, batches, val_batches):
    class Count(Callback):
        train = val = 0

        def on_batch_end(self, trainer, batch, outputs):
            Count.train += 1

        def on_validation_batch_end(self, trainer, batch, outputs):
            Count.val += 1

    trainer, train, val = make([Count()], epochs=1, limit_train_batches=limits[0], limit_val_batches=limits[1])
    trainer.fit(train, val)
    assert (Count.train, Count.val, trainer.num_batches, trainer.global_step) == (
        batches,
        val_batches,
        batches,
        batches,
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"limit_train_batches": 0}, "limit_train_batches must be a number of batches"),
        ({"limit_val_batches": 1.5}, "limit_val_batches must be a number of batches"),
        ({"limit_train_batches": True}, "limit_train_batches must be"),
        ({"val_every_n_steps": 0}, "val_every_n_steps must be a positive integer"),
        ({"max_time": "1:2"}, "max_time must be a positive number of seconds"),
        ({"max_time": -1}, "max_time must be"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_a_fraction_needs_a_loader_with_a_length():
    trainer, train, _ = make(limit_train_batches=0.5)
    with pytest.raises(ValueError, match="is a fraction, but the loader has no length"):
        trainer.fit(iter(list(train)))


# ------------------------------------------------------------------------------------------ time limit
def test_durations():
    assert parse_duration("01:30:05") == 5405 and parse_duration("2:00:00:01") == 2 * 86400 + 1
    assert parse_duration(timedelta(minutes=2)) == 120 and parse_duration(1.5) == 1.5
    assert format_duration(5405) == "1:30:05" and parse_duration(format_duration(2 * 86400 + 1)) == 2 * 86400 + 1


def test_time_limit_stops_after_the_first_step_past_it(tmp_path, fake_clock):
    class Slow(Callback):
        def on_batch_end(self, trainer, batch, outputs):
            fake_clock.advance(0.3)

    checkpoint = ModelCheckpoint(tmp_path, monitor=None)
    trainer, train, val = make([Slow(), checkpoint], epochs=3, max_time=0.75)
    with pytest.raises(TimeLimitReached, match=r"time limit 0.75 s reached after global step 3 \(epoch 1, batch 3 of"):
        trainer.fit(train, val)
    state = load_checkpoint(checkpoint.last_path)
    assert state["global_step"] == 3 and state["position"]["batches"] == 3 and not state["should_stop"]


# ------------------------------------------------------------------------------------------ CSVLogger
def test_csv_logger_writes_every_value_of_every_epoch_and_step_validation(tmp_path):
    path = tmp_path / "logs" / "metrics.csv"
    trainer, train, val = make([CSVLogger(path)], epochs=2, val_every_n_steps=4)
    history = trainer.fit(train, val)
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert list(rows[0]) == ["epoch", "step", "val_loss", "val_acc", "loss", "lr"]
    assert [(row["epoch"], row["step"]) for row in rows] == [
        ("0", "4"),
        ("0", "8"),
        ("0", "10"),
        ("1", "12"),
        ("1", "16"),
        ("1", "20"),
    ]
    epoch_rows = [row for row in rows if row["loss"]]
    assert [
        {key: float(value) for key, value in row.items() if key not in ("epoch", "step")} for row in epoch_rows
    ] == history
    assert rows[0]["loss"] == "" and not list(tmp_path.glob("logs/.*"))


def test_csv_logger_starts_a_new_file_for_a_new_fit(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("old,rows\n1,2\n")
    trainer, train, val = make([CSVLogger(path)], epochs=1)
    trainer.fit(train, val)
    assert path.read_text().splitlines()[0] == "epoch,step,loss,val_loss,val_acc,lr"
    assert len(path.read_text().splitlines()) == 2


def test_csv_logger_cuts_a_row_a_full_disk_broke_back_to_the_last_whole_row(tmp_path, mocker):
    path = tmp_path / "metrics.csv"
    logger = CSVLogger(path)
    trainer = SimpleNamespace(epoch=0, global_step=2, start_step=0, in_step_validation=False)
    logger.on_fit_start(trainer)
    logger.on_epoch_end(trainer, {"loss": 0.5})
    whole = path.read_bytes()

    class HalfARowThenFull:  # what a write on a full disk does: part of the row lands, then ENOSPC
        def __init__(self, file, fields):
            self.file = file

        def writerow(self, row):
            self.file.write("1,4,0.2")
            self.file.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    mocker.patch("trainer.callbacks.csv_logger.csv.DictWriter", HalfARowThenFull)
    trainer.epoch, trainer.global_step = 1, 4
    with pytest.raises(OSError, match="No space left on device") as full:
        logger.on_epoch_end(trainer, {"loss": 0.4})
    assert full.value.filename == str(path) and path.read_bytes() == whole


# ------------------------------------------------------------------------------------------ histograms
def test_histograms_of_weights_and_of_the_gradients_of_each_epochs_last_step(tmp_path):
    grads = {}

    def keep(optimizer, args, kwargs):
        grads["last"] = [p.grad.clone() for p in optimizer.param_groups[0]["params"]]

    histograms = HistogramCallback(tmp_path, every_n_epochs=2)
    trainer, train, val = make([histograms], epochs=4)
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: (
            keep(opt, args, kwargs) if trainer.batch_idx + 1 == trainer.num_batches and trainer.epoch == 3 else None
        )
    )
    trainer.fit(train, val)
    events = read(tmp_path)
    tags = events.Tags()["histograms"]
    assert sorted(tags) == sorted(
        [f"{kind}/{name}" for kind in ("weights", "gradients") for name in ("0.weight", "0.bias", "2.weight", "2.bias")]
    )
    assert [e.step for e in events.Histograms("gradients/0.weight")] == [20, 40]
    last = events.Histograms("gradients/2.bias")[-1].histogram_value
    expected = grads["last"][3]
    assert last.num == 3 and math.isclose(last.sum, expected.sum().item(), rel_tol=1e-5, abs_tol=1e-7)
    assert math.isclose(last.min, expected.min().item(), rel_tol=1e-6)
    # It keeps the gradients at the trainer's hook before the optimizer step, not through a torch optimizer hook.
    assert "HistogramCallback" in trainer.describe().split("on_before_optimizer_step")[1].splitlines()[0]


# ------------------------------------------------------------------------------------------ save_top_k
def test_save_top_k_keeps_the_k_best_with_the_value_in_the_name(tmp_path):
    seen = Validations()
    checkpoint = ModelCheckpoint(tmp_path, monitor="val_loss", save_top_k=2)
    trainer, train, val = make([seen, checkpoint], epochs=4, val_every_n_steps=5, val_at_epoch_end=False)
    trainer.fit(train, val)
    ranked = sorted(seen.seen, key=lambda v: v[2])[:2]
    names = [f"epoch={step // 10 + (step % 10 > 0)}-step={step}-val_loss={loss:.4f}.pt" for step, _, loss in ranked]
    assert [p.name for p in checkpoint.top_k_paths()] == names
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, "best.pt", "last.pt"])
    assert load_checkpoint(tmp_path / names[0])["global_step"] == ranked[0][0]
    assert load_checkpoint(tmp_path / "last.pt")["callbacks"]["ModelCheckpoint"]["top_k"] == [
        [loss, name] for (_, _, loss), name in zip(ranked, names)
    ]


def test_save_top_k_needs_a_monitor(tmp_path):
    with pytest.raises(ValueError, match="save_top_k needs a monitor"):
        ModelCheckpoint(tmp_path, monitor=None, save_top_k=3)


# ------------------------------------------------------------------------------------------ throughput
def test_samples_per_second_at_each_log_point_without_a_device_sync(tmp_path, mocker):
    syncs, item = [], torch.Tensor.item

    def counted(self):
        syncs.append(1)
        return item(self)

    def fit(callbacks):
        trainer, train, val = make(callbacks, epochs=2)
        mocker.patch.object(torch.Tensor, "item", counted)
        syncs.clear()
        started = time.perf_counter()
        trainer.fit(train, val)
        mocker.stopall()
        return len(syncs), time.perf_counter() - started

    without, _ = fit([])
    with_tensorboard, elapsed = fit([TensorBoardCallback(tmp_path, every_n_steps=5)])
    assert with_tensorboard == without + 4  # one per running-loss point: none for the throughput
    points = read(tmp_path).Scalars("throughput (samples per second)")
    assert [e.step for e in points] == [5, 10, 15, 20]
    assert all(20 / elapsed < e.value < 1e9 for e in points)  # 20 samples per point, all within `elapsed`


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
