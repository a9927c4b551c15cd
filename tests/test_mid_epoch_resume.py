"""Checkpoints inside an epoch, resumed exactly: step checkpoints, the time limit, the samplers."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader

from tests.conftest import make_classification
from trainer import Callback, ResumableSampler, TimeLimitReached, Trainer, TrainingInterrupted, ignore_stop_signals
from trainer.callbacks import CSVLogger, EarlyStopping, ModelCheckpoint, TensorBoardCallback
from trainer.checkpoint import load_checkpoint
from trainer_datasets import SegmentationFolder, SyntheticNuclei, TensorBatchLoader

#: Tags whose values are wall-clock measurements: only their steps are compared.
TIMED_TAGS = {"throughput (samples per second)"}


class Crash(Callback):
    """Raises at the end of global step `step` (after `ModelCheckpoint`), like a killed process."""

    order = 200

    def __init__(self, step):
        self.step = step

    def on_batch_end(self, trainer, batch, outputs):
        if trainer.global_step == self.step:
            raise RuntimeError("killed")


def loaders(kind, data):
    if kind == "sampler":
        return DataLoader(data, batch_size=4, sampler=ResumableSampler(data, seed=3))
    if kind == "list":
        x, y = data.tensors
        return [(x[i : i + 4], y[i : i + 4]) for i in range(0, len(x), 4)]
    images = (data.tensors[0].view(-1, 1, 2, 2) * 40 + 128).clamp(0, 255).to(torch.uint8)
    return TensorBatchLoader(images, data.tensors[1], batch_size=4, seed=3)


def build(run_dir, callbacks=(), epochs=3, kind="sampler", init_seed=0, **options):
    """A small classifier with dropout (it draws random numbers every step), Adam and a per-step
    schedule on 40 samples: 10 batches of 4 per epoch. Returns the trainer and its loaders."""
    torch.manual_seed(init_seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.9)
    data = make_classification(40)
    callbacks = [
        TensorBoardCallback(run_dir, every_n_steps=3),
        CSVLogger(run_dir / "metrics.csv"),
        ModelCheckpoint(run_dir, every_n_steps=4),
        *callbacks,
    ]
    trainer = Trainer(
        model,
        optimizer,
        nn.CrossEntropyLoss(),
        callbacks=callbacks,
        max_epochs=epochs,
        device="cpu",
        scheduler=scheduler,
        scheduler_interval="step",
        seed=7,
        metrics={"acc": lambda p, t: (p.argmax(1) == t).float().mean()},
        **options,
    )
    return trainer, loaders(kind, data), DataLoader(data, batch_size=16)


def run(run_dir, callbacks=(), resume=False, **options):
    trainer, train, val = build(run_dir, callbacks, **options)
    trainer.fit(train, val, resume_from=run_dir / "last.pt" if resume else None)
    return trainer


def scalars(run_dir):
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, None if tag in TIMED_TAGS else e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def assert_same_state(actual, expected, where="state"):
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), f"{where} differs"
    elif isinstance(expected, dict):
        assert sorted(actual) == sorted(expected), f"{where}: keys differ"
        for key in expected:
            assert_same_state(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: lengths differ"
        for index, (a, b) in enumerate(zip(actual, expected)):
            assert_same_state(a, b, f"{where}[{index}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def assert_same_run(run_dir, reference):
    """The run in `run_dir` ends as the `reference` run: each artefact compared on its own, so a
    failure names the one that differs."""
    assert_same_state(load_checkpoint(run_dir / "last.pt"), load_checkpoint(reference / "last.pt"), "last.pt")
    assert (run_dir / "metrics.csv").read_text() == (reference / "metrics.csv").read_text(), "metrics.csv differs"
    curves, expected = scalars(run_dir), scalars(reference)
    assert sorted(curves) == sorted(expected), "TensorBoard tags differ"
    for tag in expected:  # same steps (none twice), same values
        assert curves[tag] == expected[tag], f"TensorBoard curve {tag!r} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    references = {}

    def get(kind="sampler", **options):
        key = (kind, tuple(sorted(options.items())))
        if key not in references:
            run_dir = tmp_path_factory.mktemp("reference")
            run(run_dir, kind=kind, **options)
            references[key] = run_dir
        return references[key]

    return get


@pytest.mark.parametrize("kind", ["sampler", "list", "tensor"])
def test_killed_after_a_step_checkpoint_resumes_bit_identical(tmp_path, reference, kind):
    """Killed at step 15 (epoch 2, batch 5): last.pt is the step-12 checkpoint (epoch 2, batch 2)
    and TensorBoard holds a running-loss point at step 15; the resumed run ends as an
    uninterrupted one, with the running loss at the same steps with the same values, none twice."""
    expected = reference(kind)  # built before this test's own fits
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path, [Crash(15)], kind=kind)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["global_step"] == 12 and state["epochs_done"] == 1
    assert state["position"]["epoch"] == 1 and state["position"]["batches"] == 2
    assert [step for step, _ in scalars(tmp_path)["Loss/training loss"]] == [3, 6, 9, 12, 15]

    seen = []

    class FirstBatch(Callback):
        def on_batch_start(self, trainer, batch):
            seen.append((trainer.epoch, trainer.batch_idx))

    trainer = run(tmp_path, [FirstBatch()], kind=kind, resume=True, init_seed=99)
    assert seen[0] == (1, 2) and trainer.global_step == 30
    assert_same_run(tmp_path, expected)


def test_a_time_limit_after_every_batch_resumed_each_time_equals_the_uninterrupted_run(tmp_path, reference):
    """max_time stops after the first batch of each fit, with gradients of an unfinished
    accumulation window pending, and during no validation; 30 resumes later the run equals the
    uninterrupted one."""
    expected = reference(accumulate_grad_batches=3)
    fits = 0
    while True:
        try:
            trainer = run(tmp_path, resume=fits > 0, init_seed=fits, accumulate_grad_batches=3, max_time=1e-6)
        except TimeLimitReached as exc:
            fits += 1
            assert "reached after global step" in str(exc)
            assert exc.__notes__ == [
                f"saved {tmp_path / 'last.pt'}: continue with fit(..., resume_from={str(tmp_path / 'last.pt')!r})"
            ]
            assert fits < 40
            continue
        break
    assert fits == 30 and len(trainer.history) == 3
    assert_same_run(tmp_path, expected)


def test_a_second_fit_after_the_time_limit_continues_in_the_epoch(tmp_path, reference):
    expected = reference()
    trainer, train, val = build(tmp_path, max_time=1e-6)
    with pytest.raises(TimeLimitReached, match=r"after global step 1 \(epoch 1, batch 1 of 10\)"):
        trainer.fit(train, val)
    assert load_checkpoint(tmp_path / "last.pt")["position"]["batches"] == 1
    trainer.max_time = None
    trainer.fit(train, val)  # the same trainer goes on with the epoch's second batch
    assert_same_run(tmp_path, expected)


def test_early_stop_during_a_step_validation_then_killed_resumes_to_the_same_end(tmp_path):
    """A stop decided mid-epoch ends that epoch after the batch; a kill before its epoch end
    resumes, finishes the epoch without training more and stays stopped."""
    options = dict(val_every_n_steps=2, epochs=4)
    reference_dir = tmp_path / "reference"
    full = run(reference_dir, [EarlyStopping("val_acc", mode="max", patience=0)], **options)
    assert full.should_stop and len(full.history) < 4

    class KillAtStop(Callback):
        order = 200

        def on_batch_end(self, trainer, batch, outputs):
            if trainer.should_stop:
                raise TimeLimitReached("stopped here")

    cut = tmp_path / "cut"
    with pytest.raises(TimeLimitReached):
        run(cut, [EarlyStopping("val_acc", mode="max", patience=0), KillAtStop()], **options)
    assert load_checkpoint(cut / "last.pt")["should_stop"]
    resumed = run(cut, [EarlyStopping("val_acc", mode="max", patience=0)], resume=True, **options)
    assert resumed.history == full.history and resumed.global_step == full.global_step
    assert_same_run(cut, reference_dir)


def test_a_loader_that_cannot_start_late_warns_and_resumes_at_the_epochs_end(tmp_path):
    def stream():
        data = make_classification(40)
        for i in range(0, 40, 4):
            yield data.tensors[0][i : i + 4], data.tensors[1][i : i + 4]

    class Stream:
        def __iter__(self):
            return stream()

    torch.manual_seed(0)
    model = nn.Linear(4, 3)

    def fit(resume, callbacks=()):
        trainer = Trainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            nn.CrossEntropyLoss(),
            callbacks=[ModelCheckpoint(tmp_path, monitor=None, every_n_steps=3), *callbacks],
            max_epochs=2,
            device="cpu",
        )
        trainer.fit(Stream(), resume_from=tmp_path / "last.pt" if resume else None)
        return trainer

    with pytest.warns(RuntimeWarning, match="Stream cannot start an epoch at a given batch, so a run resumed"):
        with pytest.raises(RuntimeError):
            fit(False, [Crash(4)])
    assert load_checkpoint(tmp_path / "last.pt")["position"]["batches"] == 3
    with pytest.warns(RuntimeWarning) as caught:
        trainer = fit(True)
    messages = [str(w.message) for w in caught]
    assert any("resumes at the end of epoch 1: the batches after batch 3 of it are skipped" in m for m in messages)
    assert len(trainer.history) == 2 and trainer.global_step == 3 + 10


def test_csv_rows_of_a_killed_process_after_its_checkpoint_are_not_repeated(tmp_path):
    with pytest.raises(RuntimeError):
        run(tmp_path, [Crash(18)], val_every_n_steps=3)
    with open(tmp_path / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["step"]) for row in rows] == [3, 6, 9, 10, 12, 15, 18]  # step 18 after the step-16 checkpoint
    run(tmp_path, resume=True, val_every_n_steps=3)
    with open(tmp_path / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["step"]) for row in rows] == [3, 6, 9, 10, 12, 15, 18, 20, 21, 24, 27, 30]
    assert [row["epoch"] for row in rows if row["loss"]] == ["0", "1", "2"]


def test_no_warning_with_resumable_loaders(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(tmp_path, epochs=1)


def test_a_stop_during_the_epoch_end_validation_resumes_with_the_random_state_from_before_it(tmp_path, reference):
    """Stopped at the first validation batch of epoch 2, after its loader drew from the global
    generator: the position saved holds the generator as it was before the validation, so the
    resumed run (whose model draws dropout masks) validates again and ends as the uninterrupted one."""

    class StopInValidation(Callback):
        def on_validation_start(self, trainer):
            torch.rand(3)  # what a DataLoader's iterator does: it draws its workers' seed

        def on_validation_batch_end(self, trainer, batch, outputs):
            if trainer.epoch == 1:
                raise TrainingInterrupted("stopped during validation")

    with pytest.raises(TrainingInterrupted):
        run(tmp_path, [StopInValidation()])
    position = load_checkpoint(tmp_path / "last.pt")["position"]
    assert (position["epoch"], position["batches"]) == (1, 10)

    class DrawAtValidation(Callback):
        def on_validation_start(self, trainer):
            torch.rand(3)

    run(tmp_path, [DrawAtValidation()], resume=True)
    reference_dir = tmp_path / "reference"
    run(reference_dir, [DrawAtValidation()])
    assert_same_run(tmp_path, reference_dir)


def test_a_stop_after_every_batch_with_workers_and_augmentation_trains_as_one_uninterrupted_run(tmp_path):
    """Augmented data loaded by 2 worker processes, stopped by the time limit after every batch
    and resumed each time, ends with the weights of one uninterrupted run that loads the same data
    in the main process: each sample's augmentation depends on (seed, epoch, sample) alone."""
    data = SyntheticNuclei(8, image_size=16, seed=1).save(tmp_path / "data")

    def fit(run_dir, workers, max_time=None, resume=False):
        torch.manual_seed(0)
        dataset = SegmentationFolder(data, augment=True, seed=4)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.3), nn.Conv2d(4, 1, 1))
        loader = DataLoader(
            dataset,
            batch_size=2,
            sampler=ResumableSampler(dataset, seed=4),
            num_workers=workers,
            worker_init_fn=ignore_stop_signals if workers else None,
        )
        trainer = Trainer(
            model,
            torch.optim.Adam(model.parameters(), lr=0.01),
            nn.BCEWithLogitsLoss(),
            callbacks=[ModelCheckpoint(run_dir, monitor=None)],
            max_epochs=2,
            device="cpu",
            seed=7,
            max_time=max_time,
        )
        trainer.fit(loader, resume_from=run_dir / "last.pt" if resume else None)
        return trainer

    whole = fit(tmp_path / "whole", workers=0)
    fits = 0
    while True:
        try:
            stopped = fit(tmp_path / "stopped", workers=2, max_time=1e-6, resume=fits > 0)
        except TimeLimitReached:
            fits += 1
            assert fits < 10
            continue
        break
    assert fits == 8  # 4 batches per epoch, 2 epochs
    assert stopped.history == whole.history
    assert_same_state(stopped.module.state_dict(), whole.module.state_dict(), "model")
