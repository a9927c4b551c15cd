"""Killed, stopped and resumed runs of the NestedUNet recipe lose nothing.

The kill tests run the real command line, ``python -m recipes.nested_unet``, in subprocesses on a
tiny configuration with a fixed seed. A run is stopped at a chosen moment, found by watching its
progress bar (stderr) and its run directory, then continued with ``--resume RUN_DIR``. At the end
the run must equal an uninterrupted reference run: every value of ``last.pt`` and ``best.pt``
(weights, optimizer, scheduler, random generators, history, callback states), and every TensorBoard
curve, read back with TensorBoard's own reader, with no step logged twice.

Only the stops need a process of their own. The reference runs, a refused resume and the resumes
that run to the end use the same command line in this process (`run_cli`), which trains exactly as
a subprocess does: the recipe sets its own seed and thread count.

Two moments leave no trace outside the process: validation, and the instant after the last
checkpoint. For those the test runs the recipe's command line through a small wrapper (`HOLD`) that
holds the process at that moment until the test kills it, or until the signal the test sends has
reached the run's own handler.

Runs on a data folder (`--data`, written by the test) augment their training images, with DataLoader
workers (`--workers 2`): the stops there are signals sent to the whole process group, as a terminal's
Ctrl-C or Slurm sends them, and they must resume bit-identical too.
"""

from __future__ import annotations

import shlex
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata
from torch import nn
from torch.utils.data import TensorDataset

from recipes import nested_unet
from recipes.cli import run_cli
from tests.helpers import tiny_args
from tests.processes import RecipeProcess
from trainer import Trainer
from trainer.callbacks import ModelCheckpoint, TensorBoardCallback
from trainer.checkpoint import load_checkpoint
from trainer_datasets import SyntheticNuclei

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals")

EPOCHS = 3
#: The recipe's quickest configuration (a UNet of width 4 on 16x16 images), 2 steps per epoch.
TINY = tiny_args(epochs=EPOCHS, seed=2)
TIMEOUT = 300.0  # upper bound of every wait; a whole run takes seconds
TIMED = {"throughput (samples per second)"}  # wall-clock values: only their steps must match


def recipe(argv: Sequence[str]) -> int:
    """The recipe's command line run in this process; its exit code."""
    return run_cli(nested_unet.main, list(argv))


# The recipe's own command line, held until the process is killed (it gives up after TIMEOUT) at the
# moment named by the first argument: "validation:E" (the first validation batch of epoch E),
# "checkpoint:E" (just after the checkpoints of epoch E are written) or "step:S" (after every callback
# of global step S ran, its logs flushed to disk as the writer does from time to time). With ":signal"
# added ("step:S:signal"), held only until the run's own handler has noticed a stop signal, then on.
HOLD = f"""
import runpy, sys, threading, time
from trainer.callbacks import ModelCheckpoint
from trainer.core import Trainer

moment, epoch, *until = sys.argv.pop(1).split(":")

def hold(trainer):
    print(f"held at {{moment}}", file=sys.stderr, flush=True)
    if until == ["signal"]:
        watcher = next(cb for cb in trainer.callbacks if type(cb).__name__ == "_StopOnSignal")
        deadline = time.monotonic() + {TIMEOUT}
        while watcher.signum is None and time.monotonic() < deadline:
            time.sleep(0.005)
        return
    threading.Event().wait({TIMEOUT})
    raise SystemExit("held but never killed")

def eval_step(self, batch, original=Trainer.eval_step):
    if moment == "validation" and self.epoch + 1 == int(epoch) and not self.in_step_validation:
        hold(self)
    return original(self, batch)

def on_epoch_end(self, trainer, logs, original=ModelCheckpoint.on_epoch_end):
    original(self, trainer, logs)
    if moment == "checkpoint" and trainer.epoch + 1 == int(epoch):
        hold(trainer)

def on_batch_end(self, trainer, batch, outputs, original=ModelCheckpoint.on_batch_end):
    original(self, trainer, batch, outputs)
    if moment == "step" and trainer.global_step == int(epoch):
        trainer.resources.flush()
        hold(trainer)

Trainer.eval_step, ModelCheckpoint.on_epoch_end, ModelCheckpoint.on_batch_end = eval_step, on_epoch_end, on_batch_end
ModelCheckpoint.idle_hooks = lambda self, trainer: frozenset()  # its on_batch_end holds the run at any step
runpy.run_module("recipes.nested_unet", run_name="__main__", alter_sys=True)
"""


class Run(RecipeProcess):
    """A recipe process whose waits fail the test, with its stderr, when they come to nothing."""

    def __init__(self, args: Sequence[str], code: str | None = None, new_session: bool = False) -> None:
        super().__init__(args, code=code, timeout=TIMEOUT, new_session=new_session)

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        """Poll `condition` until it holds; fail if the process exits first or after TIMEOUT."""
        if not self.poll_until(condition):
            running = self.process.poll() is None
            code = self.stop()
            reason = f"no {what} within {TIMEOUT} s" if running else f"the run exited ({code}) before {what}"
            raise AssertionError(f"{reason}:\n{self.stderr[-3000:]}")


def epoch_started(run: Run, epoch: int) -> Callable[[], bool]:
    """Whether the progress bar of `epoch` (1-based) has appeared: that epoch is training."""
    return lambda: f"epoch {epoch}/{EPOCHS}" in run.stderr


def epochs_done(run_dir: Path) -> int:
    """Epochs recorded in the run's ``last.pt``, which must load."""
    return load_checkpoint(run_dir / "last.pt")["epochs_done"]


def assert_same(actual: Any, expected: Any, where: str = "checkpoint") -> None:
    """Recursive equality; tensors must be bit-identical (`torch.equal`, same dtype)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), f"{where} differs"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(actual) == sorted(expected), f"{where}: keys differ"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), f"{where}: lengths differ"
        for index, (a, b) in enumerate(zip(actual, expected)):
            assert_same(a, b, f"{where}[{index}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def read_events(run_dir: Path) -> EventAccumulator:
    """The run's TensorBoard events as TensorBoard shows them (purged points dropped)."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def assert_no_duplicated_steps(events: EventAccumulator) -> None:
    """No scalar or image tag has two points at one step."""
    tags = events.Tags()
    for tag in tags["scalars"]:
        steps = [event.step for event in events.Scalars(tag)]
        assert len(steps) == len(set(steps)), f"scalar {tag!r} repeats steps: {steps}"
    for tag in tags["images"]:
        steps = [event.step for event in events.Images(tag)]
        assert len(steps) == len(set(steps)), f"image {tag!r} repeats steps: {steps}"


def assert_matches_reference(run_dir: Path, reference: Path) -> None:
    """The finished run equals the uninterrupted `reference` run: checkpoints, history, curves."""
    for name in ("last.pt", "best.pt"):
        state, expected = load_checkpoint(run_dir / name), load_checkpoint(reference / name)
        assert state["history"] == expected["history"], name
        assert_same(state, expected, name)
    events, expected = read_events(run_dir), read_events(reference)
    assert_no_duplicated_steps(events)
    tags = events.Tags()
    assert set(tags["scalars"]) == set(expected.Tags()["scalars"])
    for tag in tags["scalars"]:
        points = [(e.step, None if tag in TIMED else e.value) for e in events.Scalars(tag)]
        assert points == [(e.step, None if tag in TIMED else e.value) for e in expected.Scalars(tag)], tag
    assert set(tags["images"]) == set(expected.Tags()["images"])
    for tag in tags["images"]:
        assert [e.step for e in events.Images(tag)] == [e.step for e in expected.Images(tag)], tag
    assert tags["graph"]
    assert (run_dir / "metrics.csv").read_text() == (reference / "metrics.csv").read_text()
    visible = {p.name for p in run_dir.iterdir() if not p.name.startswith((".", "events.out.tfevents."))}
    assert visible == {"config.json", "last.pt", "best.pt", "metrics.csv"}


def uninterrupted_run(tmp_path_factory, options: list[str]) -> Path:
    """The run directory of `options` trained to the end without interruption (in this process)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert recipe([*options, "--log-dir", str(run_dir)]) == 0
    return run_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of TINY."""
    return uninterrupted_run(tmp_path_factory, TINY)


def test_sigkill_at_each_moment_then_resume_matches_reference(reference, tmp_path, capsys):
    """SIGKILL before the first checkpoint (its resume is refused, nothing changed; the run starts
    anew), then during validation, during a checkpoint write and just after the last checkpoint,
    resuming after each: the finished run equals the uninterrupted one. (A kill during a training
    step is the next test's.)"""
    run_dir = tmp_path / "run"
    resume = ["--resume", str(run_dir)]

    run = Run([*TINY, "--log-dir", str(run_dir)])
    run.wait_for(epoch_started(run, 1), "epoch 1")
    assert run.stop() == -signal.SIGKILL
    assert (run_dir / "config.json").is_file() and not list(run_dir.glob("*.pt"))

    def files() -> dict[str, bytes]:  # the killed run's stale lock is taken over and released: not compared
        return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != ".lock"}

    before = files()
    assert recipe(resume) == 2  # no checkpoint to continue from: refused, nothing changed
    assert "there is no last.pt" in capsys.readouterr().err
    assert files() == before
    shutil.rmtree(run_dir)

    run = Run(["validation:2", *TINY, "--log-dir", str(run_dir)], code=HOLD)  # started anew
    run.wait_for(lambda: "held at validation" in run.stderr, "validation of epoch 2")
    assert run.stop() == -signal.SIGKILL
    assert epochs_done(run_dir) == 1

    # In an epoch that improves the monitored value best.pt is written first, then last.pt.
    history = load_checkpoint(reference / "last.pt")["history"]
    name = "best.pt" if history[1]["val_iou"] > history[0]["val_iou"] else "last.pt"
    run = Run(resume)
    run.wait_for(lambda: any(run_dir.glob(f".{name}.*.tmp")), f"the temporary file of {name}")
    assert run.stop() == -signal.SIGKILL
    assert list(run_dir.glob(f".{name}.*.tmp")), f"the write of {name} ended before the kill landed"
    last, best = load_checkpoint(run_dir / "last.pt"), load_checkpoint(run_dir / "best.pt")
    assert last["epochs_done"] == 1
    assert best["epochs_done"] == last["callbacks"]["ModelCheckpoint"]["best_epoch"] + 1

    run = Run([f"checkpoint:{EPOCHS}", *resume], code=HOLD)
    run.wait_for(lambda: "held at checkpoint" in run.stderr, f"the checkpoints of epoch {EPOCHS}")
    assert run.stop() == -signal.SIGKILL
    assert epochs_done(run_dir) == EPOCHS

    assert recipe(resume) == 0  # nothing left to train
    assert_matches_reference(run_dir, reference)


#: 16 steps per epoch; last.pt every 3 steps, a validation every 4, the running loss every 10.
MID_EPOCH = tiny_args(train_samples=64, epochs=2, seed=2, checkpoint_every=3, val_every=4)


@pytest.fixture(scope="module")
def mid_epoch_reference(tmp_path_factory) -> Path:
    """An uninterrupted run of MID_EPOCH."""
    return uninterrupted_run(tmp_path_factory, MID_EPOCH)


def test_sigkill_inside_an_epoch_after_a_step_checkpoint_resumes_at_the_next_batch(
    mid_epoch_reference, tmp_path, capsys, monkeypatch
):
    """Killed at step 20 (epoch 2, batch 4), after the step-18 checkpoint and after step 20's
    validation and running loss reached the event file: the resume starts at batch 3 of epoch 2
    without loading batches 1 and 2, and the run ends bit-identical to an uninterrupted one, every
    TensorBoard curve (the running loss and the step validations included) at the same steps with
    the same values, no step twice, and metrics.csv without repeated rows."""
    run_dir = tmp_path / "run"
    run = Run(["step:20", *MID_EPOCH, "--log-dir", str(run_dir)], code=HOLD)
    run.wait_for(lambda: "held at step" in run.stderr, "step 20")
    assert run.stop() == -signal.SIGKILL
    state = load_checkpoint(run_dir / "last.pt")
    assert state["global_step"] == 18 and state["position"]["epoch"] == 1 and state["position"]["batches"] == 2
    events = read_events(run_dir)
    assert [e.step for e in events.Scalars("Loss/training loss")] == [10, 20]  # 20: after the checkpoint
    assert [e.step for e in events.Scalars("Loss/validation")][-1] == 20
    assert "\n1,20," in (run_dir / "metrics.csv").read_text()

    loaded: dict[int, int] = {}  # items each TensorDataset (by its length) gives the resumed run
    getitem = TensorDataset.__getitem__

    def counted(self: TensorDataset, index: Any) -> Any:
        loaded[len(self)] = loaded.get(len(self), 0) + 1
        return getitem(self, index)

    monkeypatch.setattr(TensorDataset, "__getitem__", counted)
    capsys.readouterr()
    assert recipe(["--resume", str(run_dir)]) == 0
    assert "| 2/16 [" in capsys.readouterr().err  # the progress bar of epoch 2 starts at batch 2 done
    assert loaded[64] == 14 * 4  # of the 64 training images, only those of the 14 batches left
    assert_matches_reference(run_dir, mid_epoch_reference)
    assert [e.step for e in read_events(run_dir).Scalars("Loss/training loss")] == [10, 20, 30]


#: A data folder of 10 images, split into 8 augmented training images and 2 for validation, loaded
#: by 2 worker processes: 4 steps per epoch.
FOLDER = tiny_args(train_samples=None, val_samples=None, batch_size=2, epochs=2, seed=2)


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory) -> Path:
    """A segmentation folder of 10 PNG images with their masks."""
    return SyntheticNuclei(10, image_size=16, seed=1).save(tmp_path_factory.mktemp("data") / "nuclei")


@pytest.fixture(scope="module")
def workers_reference(tmp_path_factory, data_folder) -> Path:
    """An uninterrupted run of FOLDER on the data folder with 2 workers."""
    return uninterrupted_run(tmp_path_factory, [*FOLDER, "--data", str(data_folder), "--workers", "2"])


def test_any_number_of_workers_draws_the_same_augmentations(workers_reference, data_folder, tmp_path_factory):
    """Each sample's augmentation depends on the seed, the epoch and the sample alone: the same run
    with its data loaded in the main process (--workers 0) ends with the same weights and history."""
    in_process = uninterrupted_run(tmp_path_factory, [*FOLDER, "--data", str(data_folder), "--workers", "0"])
    state, expected = load_checkpoint(in_process / "last.pt"), load_checkpoint(workers_reference / "last.pt")
    assert state["history"] == expected["history"]
    assert_same(state["model"], expected["model"], "model")


@pytest.mark.parametrize(
    ("signum", "code", "moment", "position"),
    [(signal.SIGTERM, 143, "step:2", (0, 2)), (signal.SIGINT, 130, "validation:1", (0, 4))],
    ids=["SIGTERM-in-a-step", "SIGINT-in-validation"],
)
def test_a_signal_to_the_process_group_with_workers_stops_once_and_resumes_bit_identical(
    workers_reference, data_folder, tmp_path, capsys, signum, code, moment, position
):
    """SIGTERM (as Slurm and systemd send it) at step 2 of epoch 1, or SIGINT (Ctrl-C) while epoch 1
    validates (its loader's workers started, their seed drawn), sent to the whole process group
    while the 2 DataLoader workers run: the workers ignore it and the main process stops once: one
    "stopping" line, one line with the resume command, no traceback, exit 143 or 130, the position
    inside the epoch saved (after a validation stop: epoch 1 trained, not validated). The printed
    command resumes the run, which validates epoch 1 again from the random state it had before that
    validation, and ends bit-identical to the uninterrupted one."""
    run_dir = tmp_path / "run"
    run = Run(
        [f"{moment}:signal", *FOLDER, "--data", str(data_folder), "--workers", "2", "--log-dir", str(run_dir)],
        code=HOLD,
        new_session=True,
    )
    run.wait_for(lambda: "held at" in run.stderr, moment)
    assert run.signal_group(signum) == code, run.stderr[-3000:]
    name = signal.Signals(signum).name
    assert run.stderr.count(f"{name}: stopping after the current step") == 1, run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if "resume with" in line]
    assert lines == [f"stopped; resume with: python -m recipes.nested_unet --resume {run_dir}"]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    state = load_checkpoint(run_dir / "last.pt")
    assert state["epochs_done"] == 0 and (state["position"]["epoch"], state["position"]["batches"]) == position

    python, module, name, *arguments = shlex.split(lines[0].removeprefix("stopped; resume with: "))
    assert (python, module, name) == ("python", "-m", "recipes.nested_unet")
    assert recipe(arguments) == 0
    assert f"run written to: {run_dir}" in capsys.readouterr().out
    assert_matches_reference(run_dir, workers_reference)


def test_resuming_a_finished_run_logs_nothing_twice(tmp_path, regression_loaders):
    """Resuming a run that already finished trains nothing and adds no TensorBoard point."""
    train, val = regression_loaders
    for resume_from in (None, tmp_path / "last.pt"):
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        trainer = Trainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.01),
            nn.MSELoss(),
            max_epochs=2,
            callbacks=[TensorBoardCallback(tmp_path, every_n_steps=1), ModelCheckpoint(tmp_path)],
            device="cpu",
        )
        trainer.fit(train, val, resume_from=resume_from)
    events = read_events(tmp_path)
    assert_no_duplicated_steps(events)
    assert [event.step for event in events.Tensors("_hparams_/session_start_info")] == [0]  # once, at the start


def test_a_run_resumed_with_more_epochs_holds_one_hparams_entry(tmp_path, regression_loaders):
    """2 epochs, then resumed to 3 (from last.pt) and, in the same process, fit on to 4: the
    HParams tab has the one entry written when the run started, whose metrics TensorBoard reads
    from the curves (so they show the run's final values)."""
    train, val = regression_loaders
    for epochs, resume_from in ((2, None), (3, tmp_path / "last.pt")):
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        trainer = Trainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.01),
            nn.MSELoss(),
            max_epochs=epochs,
            callbacks=[TensorBoardCallback(tmp_path, every_n_steps=1), ModelCheckpoint(tmp_path)],
            device="cpu",
        )
        trainer.fit(train, val, resume_from=resume_from)
    trainer.max_epochs = 4
    trainer.fit(train, val)
    events = read_events(tmp_path)
    assert_no_duplicated_steps(events)
    starts = events.Tensors("_hparams_/session_start_info")
    assert [event.step for event in starts] == [0]
    content = events.PluginTagToContent("hparams")
    assert metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG]).hparams["epochs"]
    metrics = [
        info.name.tag for info in metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG]).metric_infos
    ]
    assert metrics == ["Loss/validation", "Loss/training (epoch mean)"]
    assert [e.step for e in events.Scalars("Loss/validation")][-1] == trainer.global_step


def test_a_data_error_listing_several_problems_is_one_line(tmp_path, capsys):
    """A data folder with several problems is refused with exit code 2 and one line naming each."""
    data = SyntheticNuclei(4, image_size=16, seed=1).save(tmp_path / "data")
    (data / "masks" / "0" / "0001.png").unlink()
    (data / "images" / "0002.png").unlink()
    assert run_cli(nested_unet.main, ["--data", str(data), "--log-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "images/0001.png" in err and "masks/0/0002.png" in err
    assert not (tmp_path / "run").exists()
