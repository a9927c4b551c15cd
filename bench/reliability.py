"""Faults thrown at the NestedUNet recipe's real command line, many times, with the outcome of each.

    python -m bench.reliability [--trials 2] [--seed 0] [--arch UNet] [--epochs 3] [--quick] [--bad-input-only]

Interruptions, each trial in a fresh run directory. A random moment is a random milestone of the
process (its run directory recorded, an epoch's progress bar appearing) plus a random part of the
time to the next milestone in an uninterrupted reference run, drawn from `random.Random(--seed)`:

- SIGKILL at random moments: a fresh run killed at a random moment, its resume killed at another,
  then resumed to the end.
- SIGTERM / SIGINT at a random moment of the training of a random epoch (not the last): the run
  must exit with 143 / 130 and print one line with the resume command; that command then finishes
  the run.
- SIGKILL during a checkpoint write: the run is killed as soon as the temporary file of ``best.pt``
  or ``last.pt`` (random) of a random epoch appears, then resumed.
- SIGKILL inside an epoch with step checkpoints: a run with ``--checkpoint-every 3 --val-every 4``
  (8 steps per epoch) killed at a random moment of a random epoch but the last, then resumed: it continues at
  the batch after its last step checkpoint. Compared with its own uninterrupted reference.
- SIGKILL before the first checkpoint: killed at a random moment between the run directory's
  ``config.json`` and the first checkpoint write (at the latest as that write begins): its
  ``--resume`` must be refused (exit 2, one line, the folder unchanged, as after any kill before
  the first checkpoint); the run is then started anew.

- SIGTERM / SIGINT to the process group, with workers: as above, on a generated data folder with
  augmentation and ``--workers 2``, the signal sent with ``os.killpg`` to the group the run leads;
  exactly one "stopping" line, the resume line, exit 143 / 130.
- SIGINT during the end-of-epoch validation of a random epoch (with workers), then resumed.
- ``--max-time`` of 1 or 2 s (with workers), resumed with the printed command until the run ends.
- Two runs started at once on one ``--log-dir``: one trains, the other exits with 2 naming the holder.
- ``--resume`` of a live run (paused with SIGSTOP after a random epoch): exit 2 naming the holder,
  the folder unchanged; the run then finishes.
- ``--resume`` of a live run whose ``.lock`` was removed: still refused (the lock holds the folder).
- The run folder moved while the run trains: exit 2, one line naming the new place and the resume
  command, nothing written at the old path; that command finishes the run.
- Streamed images (``--data-mode stream --workers 2``) removed at the start of a random epoch: the
  run exits 2 within seconds with one line naming the file (it used to hang on its workers); with
  the files back, the printed command finishes the run.
- Label maps of 300 classes: the run finishes, its peak memory bounded (the confusion figure).
- The board's server registry made first by another user (root only) in a shared TMPDIR, and an
  entry of one's own registry naming a pid of another process: refused in one line; that process
  is not stopped.
- A full disk (a tmpfs mounted for the trial, filled after a random epoch; needs root, else the
  row says "skipped"): one ``error:`` line, exit 2, no temporary file; resumed once there is room.
- Two default runs (automatic precision, layout, threads) with one seed, idle and beside a
  CPU-bound process: identical weights.

Each finished run is compared with an uninterrupted reference run of the same configuration:
``last.pt`` and ``best.pt`` must be equal value for value (every tensor bit-identical), and every
TensorBoard scalar curve (read with TensorBoard's own reader, which applies purges) must be equal
(the throughput, a wall-clock rate, at the same steps), with no scalar or image tag logged twice at
one step, and ``metrics.csv`` must be equal.

Bad input (deterministic, run once each; also ``--resume`` without ``last.pt``, ``predict`` onto
existing outputs or with a checkpoint that is not this recipe's, Fashion-MNIST IDX files): the
command must exit with 2, print one line naming the fault, and write nothing (names, sizes and
modification times under the folders it names unchanged). Hostile files too: checkpoints whose class
names lead out of ``--out`` or whose sizes would take all memory, a pickle that would run a command,
a checkpoint with compressed records, a ``classes.txt`` line ``..``, a ``.lock`` that links to another
file, a weights-only ``last.pt`` to resume, a ``.gz`` bomb; ``--bad-input-only`` runs these alone.

A trial passes when the fault landed where it was meant to and the finished run matches.
Prints a Markdown table: fault | trials | outcome, with where the faults landed. Exit code 0 when
every trial passed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import json
import logging
import os
import pickle
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bench.common import add_arch_option
from models import FashionCNN, UNet
from tests.processes import RecipeProcess, checkout_env
from trainer.callbacks.checkpoint import CHECKPOINT_BEST, CHECKPOINT_LAST
from trainer.checkpoint import load_checkpoint
from trainer.model_spec import record_model
from trainer.trained_model import export_model
from trainer_datasets import CLASSES as FASHION_CLASSES
from trainer_datasets import SyntheticNuclei, write_label_map, write_png_file
from trainer_datasets.fashion_mnist import make_learnable_fashion_like, raw_folder, write_fashion_mnist_idx

TIMEOUT = 600.0  # upper bound of every wait
TIMED_TAGS = {"throughput (samples per second)"}  # wall-clock values: only their steps must match


def tiny_config(arch: str, epochs: int) -> list[str]:
    """The recipe options of every interrupted run: a few seconds of training on the CPU."""
    return [
        "--arch",
        arch,
        "--train-samples",
        "8",
        "--val-samples",
        "4",
        "--image-size",
        "16",
        "--batch-size",
        "4",
        "--epochs",
        str(epochs),
        "--precision",
        "32",
        "--channels-last",
        "off",
        "--seed",
        "2",
        "--device",
        "cpu",
    ]


def workers_config(arch: str, epochs: int, data: Path) -> list[str]:
    """`tiny_config` on a data folder (16 augmented training images, 4 for validation: 4 steps
    per epoch) loaded by 2 worker processes."""
    config = tiny_config(arch, epochs)
    for option in ("--train-samples", "--val-samples"):  # built-in data only
        del config[config.index(option) : config.index(option) + 2]
    return [*config, "--data", str(data), "--workers", "2"]


def default_config(arch: str, epochs: int) -> list[str]:
    """`tiny_config` with the automatic precision, layout and thread count (no --precision,
    --channels-last, --threads)."""
    config = tiny_config(arch, epochs)
    for option in ("--precision", "--channels-last"):
        del config[config.index(option) : config.index(option) + 2]
    return config


# Runs the recipe's command line and, when it begins the validation at the end of epoch E (the first
# argument), prints "validating epoch E" and holds until the run's own handler has noticed a stop
# signal (at most TIMEOUT), so that a signal sent on that line lands during that validation.
AT_VALIDATION = f"""
import runpy, sys, time
from trainer.core import Trainer

epoch, held = int(sys.argv.pop(1)), []

def eval_step(self, batch, original=Trainer.eval_step):
    if self.epoch + 1 == epoch and not self.in_step_validation and not held:
        held.append(True)
        print(f"validating epoch {{epoch}}", file=sys.stderr, flush=True)
        watcher = next(cb for cb in self.callbacks if type(cb).__name__ == "_StopOnSignal")
        deadline = time.monotonic() + {TIMEOUT}
        while watcher.signum is None and time.monotonic() < deadline:
            time.sleep(0.005)
    return original(self, batch)

Trainer.eval_step = eval_step
runpy.run_module("recipes.nested_unet", run_name="__main__", alter_sys=True)
"""

# The Fashion-MNIST recipe's command line.
FASHION = "import runpy; runpy.run_module('recipes.fashion_mnist', run_name='__main__', alter_sys=True)"


def mid_epoch_config(arch: str, epochs: int) -> list[str]:
    """`tiny_config` with 8 steps per epoch, a step checkpoint every 3 and a validation every 4."""
    config = tiny_config(arch, epochs)
    config[config.index("--train-samples") + 1] = "32"
    return [*config, "--checkpoint-every", "3", "--val-every", "4"]


class Run(RecipeProcess):
    """A recipe process with this benchmark's waits (TIMEOUT).

    Args:
        args: the command-line arguments.
        code: Python code run with the arguments instead of ``recipes.nested_unet``.
        new_session: start it in a process group of its own, for `signal_group`.
    """

    def __init__(self, args: Sequence[str], code: str | None = None, new_session: bool = False) -> None:
        super().__init__(args, code=code, timeout=TIMEOUT, new_session=new_session)

    def wait_for(self, condition: Callable[[], bool]) -> bool:
        """Poll `condition` until it holds (True) or the process exits without it (False)."""
        return self.poll_until(condition)


def epoch_started(run: Run, epoch: int, epochs: int) -> Callable[[], bool]:
    """Whether the progress bar of `epoch` (1-based) has appeared."""
    return lambda: f"epoch {epoch}/{epochs}" in run.stderr


def temporary_files(run_dir: Path, name: str = "*.pt") -> list[Path]:
    """The temporary files of checkpoint writes in progress (or cut short) in `run_dir`."""
    return sorted(run_dir.glob(f".{name}.*.tmp"))


# ----------------------------------------------------------------------------------------- comparison
def differences(actual: Any, expected: Any, where: str) -> list[str]:
    """Where `actual` differs from `expected`; tensors must be bit-identical."""
    if isinstance(expected, torch.Tensor):
        same = isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype and torch.equal(actual, expected)
        return [] if same else [f"{where} differs"]
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or sorted(actual) != sorted(expected):
            return [f"{where}: keys differ"]
        return [d for key in expected for d in differences(actual[key], expected[key], f"{where}[{key!r}]")]
    if isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
            return [f"{where}: lengths differ"]
        return [d for i, (a, b) in enumerate(zip(actual, expected)) for d in differences(a, b, f"{where}[{i}]")]
    return [] if actual == expected else [f"{where}: {actual!r} != {expected!r}"]


def read_events(run_dir: Path) -> EventAccumulator:
    """The run's TensorBoard events as TensorBoard shows them (purged points dropped)."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def duplicated_steps(events: EventAccumulator) -> list[str]:
    """Scalar and image tags with two points at one step."""
    tags = events.Tags()
    found = []
    for kind, read in (("scalars", events.Scalars), ("images", events.Images)):
        for tag in tags[kind]:
            steps = [event.step for event in read(tag)]
            if len(steps) != len(set(steps)):
                found.append(f"{kind} {tag!r} repeats steps {steps}")
    return found


def compare_with_reference(run_dir: Path, reference: Path, described: Sequence[str] = ()) -> list[str]:
    """Problems of a finished run against the uninterrupted reference; empty when identical.
    `described` names configuration entries that only describe the run (such as how the
    precision was chosen) and are not compared."""
    problems = []
    for name in (CHECKPOINT_LAST, CHECKPOINT_BEST):
        try:
            state = load_checkpoint(run_dir / name)
        except (OSError, ValueError) as exc:
            problems.append(f"{name} does not load: {exc}")
            continue
        expected = load_checkpoint(reference / name)
        for key in described:
            state["config"].pop(key, None)
            expected["config"].pop(key, None)
        problems += differences(state, expected, name)
    events, expected = read_events(run_dir), read_events(reference)
    problems += duplicated_steps(events)
    if set(events.Tags()["scalars"]) != set(expected.Tags()["scalars"]):
        problems.append(f"scalar tags differ: {sorted(events.Tags()['scalars'])}")
    for tag in expected.Tags()["scalars"]:
        if tag in events.Tags()["scalars"]:
            points = [(e.step, None if tag in TIMED_TAGS else e.value) for e in events.Scalars(tag)]
            if points != [(e.step, None if tag in TIMED_TAGS else e.value) for e in expected.Scalars(tag)]:
                problems.append(f"scalar curve {tag!r} differs: {points}")
    for tag in expected.Tags()["images"]:
        steps = [e.step for e in events.Images(tag)] if tag in events.Tags()["images"] else []
        if steps != [e.step for e in expected.Images(tag)]:
            problems.append(f"image {tag!r} logged at steps {steps}")
    csv, expected_csv = run_dir / "metrics.csv", reference / "metrics.csv"
    if not csv.is_file() or csv.read_text() != expected_csv.read_text():
        problems.append("metrics.csv differs")
    return problems


# ----------------------------------------------------------------------------------------- interruptions
class Reference(NamedTuple):
    """The uninterrupted run, and the seconds after its start at which each milestone was seen:
    ``config`` (the run directory is recorded), ``epoch E`` (its progress bar appears),
    ``checkpoint`` (the first checkpoint write begins) and ``end``."""

    run_dir: Path
    seen: dict[str, float]
    improved: list[bool]

    def gap(self, milestone: str, epochs: int) -> float:
        """Seconds from `milestone` to the next one: a config or an epoch's span."""
        order = ["config", *(f"epoch {e}" for e in range(1, epochs + 1)), "end"]
        return self.seen[order[order.index(milestone) + 1]] - self.seen[milestone]


def milestones(run: Run, run_dir: Path, epochs: int) -> dict[str, Callable[[], bool]]:
    """Conditions that mark a run's progress, by name (see `Reference`)."""
    return {
        "config": lambda: (run_dir / "config.json").is_file(),
        "checkpoint": lambda: bool(temporary_files(run_dir)) or (run_dir / CHECKPOINT_LAST).is_file(),
        **{f"epoch {e}": epoch_started(run, e, epochs) for e in range(1, epochs + 1)},
    }


def run_reference(root: Path, config: list[str], epochs: int, name: str = "reference") -> Reference:
    """Run the configuration uninterrupted in ``root / name``, timing its milestones."""
    run_dir = root / name
    run = Run([*config, "--log-dir", str(run_dir)])
    conditions = milestones(run, run_dir, epochs)
    seen: dict[str, float] = {}

    def record() -> bool:
        seen.update({name: run.elapsed() for name, happened in conditions.items() if name not in seen and happened()})
        return False

    run.wait_for(record)  # polls until the process exits
    seen["end"] = run.elapsed()
    if run.finish() != 0 or len(seen) != len(conditions) + 1:
        raise SystemExit(f"the reference run failed:\n{run.stderr[-3000:]}")
    scores = [logs["val_iou"] for logs in load_checkpoint(run_dir / CHECKPOINT_LAST)["history"]]
    improved = [i == 0 or scores[i] > max(scores[:i]) for i in range(len(scores))]
    return Reference(run_dir, seen, improved)


def epochs_done(run_dir: Path) -> int:
    """Epochs recorded in the run's last.pt (0 without one)."""
    return load_checkpoint(run_dir / CHECKPOINT_LAST)["epochs_done"] if (run_dir / CHECKPOINT_LAST).is_file() else 0


def where_killed(run_dir: Path, epochs: int) -> str:
    """What the run directory says about the moment a run was killed."""
    if not (run_dir / "config.json").is_file():
        return "before the run directory"
    if temporary_files(run_dir):
        return "during a checkpoint write"
    if not (run_dir / CHECKPOINT_LAST).is_file():
        return "before the first checkpoint"
    done = epochs_done(run_dir)
    return "after the last checkpoint" if done == epochs else f"in epoch {done + 1}"


def wait_random(run: Run, start: Callable[[], bool], seconds: float, cutoff: Callable[[], bool]) -> bool:
    """Wait for `start`, then `seconds` more or until `cutoff` holds, whichever comes first; False
    when the process exits before."""
    if not run.wait_for(start):
        return False
    deadline = run.elapsed() + seconds
    return run.wait_for(lambda: run.elapsed() >= deadline or cutoff())


class Trial(NamedTuple):
    """One trial's verdict and notes."""

    ok: bool
    notes: list[str]


def continue_args(run_dir: Path, config: list[str], notes: list[str]) -> list[str]:
    """The command line that continues a killed run: ``--resume`` from its ``last.pt``. A run
    killed before its first checkpoint cannot be resumed: its ``--resume`` must exit with 2, in
    one line, and change nothing (a problem is noted otherwise); the folder is then removed and
    the run started anew."""
    if (run_dir / CHECKPOINT_LAST).is_file():
        return ["--resume", str(run_dir)]
    if not run_dir.exists():  # killed before it made its folder
        return [*config, "--log-dir", str(run_dir)]
    # The killed run's stale .lock is taken over and removed by the refused resume, as documented.
    before = [entry for entry in snapshot(run_dir) if entry[0] != ".lock"]
    run = Run(["--resume", str(run_dir)])
    code = run.finish()
    if code != 2 or f"no {CHECKPOINT_LAST}" not in run.stderr or run.stderr.count("error:") != 1:
        notes.append(f"PROBLEM: resume without last.pt exited with {code}: {run.stderr[-300:]}")
    after = snapshot(run_dir)
    if after != before:
        changed = sorted({entry[0] for entry in set(after) ^ set(before)})
        notes.append(f"PROBLEM: the refused resume changed the run folder: {changed}")
    shutil.rmtree(run_dir)
    notes.append("resume refused, started anew")
    return [*config, "--log-dir", str(run_dir)]


def finish_and_compare(run_dir: Path, args: list[str], reference: Reference, notes: list[str]) -> Trial:
    """Run `args` to the end and compare the run with the reference (a note starting with
    ``PROBLEM`` fails the trial too)."""
    if any(note.startswith("PROBLEM") for note in notes):
        return Trial(False, notes)
    run = Run(args)
    code = run.finish()
    if code != 0:
        return Trial(False, [*notes, f"the final run exited with {code}: {run.stderr[-500:]}"])
    problems = compare_with_reference(run_dir, reference.run_dir)
    return Trial(not problems, notes + problems[:3])


def trial_random_kills(
    run_dir: Path, config: list[str], reference: Reference, rng: random.Random, epochs: int
) -> Trial:
    """SIGKILL at a random moment of a fresh run, again at a random moment of its resume, then finish.

    A moment is a random milestone still ahead of the process (its run directory being recorded,
    an epoch's start) plus a random part of the time to the next milestone in the reference run.
    """
    notes: list[str] = []
    for attempt in range(2):
        done = epochs_done(run_dir)
        if attempt and done == epochs:
            break
        run = Run(continue_args(run_dir, config, notes) if attempt else [*config, "--log-dir", str(run_dir)])
        conditions = milestones(run, run_dir, epochs)
        ahead = [f"epoch {e}" for e in range(done + 1, epochs + 1)] + ([] if attempt else ["config"])
        anchor = rng.choice(ahead)
        if wait_random(run, conditions[anchor], rng.uniform(0.0, reference.gap(anchor, epochs)), lambda: False):
            run.stop()
            notes.append(where_killed(run_dir, epochs))
        else:
            run.finish()
            notes.append("finished before the kill")
    return finish_and_compare(run_dir, continue_args(run_dir, config, notes), reference, notes)


def resume_point(run_dir: Path) -> str:
    """Where a run stopped inside an epoch resumes, from its ``last.pt``'s position."""
    position = load_checkpoint(run_dir / CHECKPOINT_LAST).get("position")
    return (
        f"resumed inside epoch {position['epoch'] + 1} at batch {position['batches'] + 1}"
        if position
        else "resumed at an epoch's end"
    )


def check_stop_output(run: Run, run_dir: Path, signum: int, code: int) -> list[str]:
    """Problems of a run stopped by `signum`: its exit code must be 128 + `signum`, its stderr must
    hold exactly one "stopping" line and exactly one resume line."""
    problems = [] if code == 128 + signum else [f"exit code {code}, expected {128 + signum}"]
    stopping = run.stderr.count(f"{signal.Signals(signum).name}: stopping after the current step")
    if stopping != 1:
        problems.append(f"{stopping} stopping lines")
    lines = [line for line in run.stderr.splitlines() if "--resume" in line]
    if lines != [f"stopped; resume with: python -m recipes.nested_unet --resume {run_dir}"]:
        problems.append(f"resume lines: {lines}")
    if "Traceback" in run.stderr:
        problems.append("a traceback: " + run.stderr[run.stderr.index("Traceback") :][-300:])
    return problems


def trial_signal(
    run_dir: Path,
    config: list[str],
    reference: Reference,
    rng: random.Random,
    signum: int,
    epochs: int,
    group: bool = False,
) -> Trial:
    """`signum` at a random moment of a random epoch: exit 128 + signum, one "stopping" line, one
    resume line, then finish with the printed command.

    With `group`, the run has a process group of its own and the signal goes to the whole group
    (its DataLoader workers too), as Ctrl-C in a terminal or a job scheduler sends it.
    """
    epoch = rng.randint(1, epochs - 1)
    run = Run([*config, "--log-dir", str(run_dir)], new_session=group)
    conditions = milestones(run, run_dir, epochs)
    length = (reference.seen[f"epoch {epochs}"] - reference.seen["epoch 1"]) / (epochs - 1)
    next_epoch = conditions[f"epoch {epoch + 1}"]
    if not wait_random(run, conditions[f"epoch {epoch}"], rng.uniform(0.0, length), next_epoch):
        run.finish()
        return Trial(False, [f"in epoch {epoch}", "the run ended before the signal"])
    notes = [f"at the start of epoch {epoch + 1}" if next_epoch() else f"in epoch {epoch}"]
    code = run.signal_group(signum) if group else run.stop(signum)
    if code != 128 + signum and epochs_done(run_dir) == epochs:
        problems = compare_with_reference(run_dir, reference.run_dir)
        return Trial(not problems, [f"arrived after the last step (exit {code})", *problems[:3]])
    problems = check_stop_output(run, run_dir, signum, code)
    if problems:
        return Trial(False, [*notes, *problems])
    line = next(line for line in run.stderr.splitlines() if "--resume" in line)
    return finish_and_compare(run_dir, shlex.split(line.split(": ", 1)[1])[3:], reference, [resume_point(run_dir)])


def trial_validation_signal(
    run_dir: Path, config: list[str], reference: Reference, rng: random.Random, epochs: int
) -> Trial:
    """SIGINT during the validation at the end of a random epoch (the run held there until its
    handler has seen the signal): exit 130, one stopping line, one resume line, then finish."""
    epoch = rng.randint(1, epochs)
    run = Run([str(epoch), *config, "--log-dir", str(run_dir)], code=AT_VALIDATION)
    if not run.wait_for(lambda: f"validating epoch {epoch}" in run.stderr):
        run.finish()
        return Trial(False, [f"epoch {epoch}", f"never validated: {run.stderr[-300:]}"])
    code = run.stop(signal.SIGINT)
    problems = check_stop_output(run, run_dir, signal.SIGINT, code)
    if problems:
        return Trial(False, [f"epoch {epoch}", *problems])
    return finish_and_compare(run_dir, ["--resume", str(run_dir)], reference, [f"validation of epoch {epoch}"])


def trial_time_limit(run_dir: Path, config: list[str], reference: Reference, rng: random.Random, epochs: int) -> Trial:
    """``--max-time`` of 1 or 2 s (random), resumed with the command it prints and the same limit
    until the run ends (at most 30 processes), then compared with the reference."""
    limit = f"00:00:0{rng.randint(1, 2)}"
    args, stops = [*config, "--log-dir", str(run_dir), "--max-time", limit], 0
    for _ in range(30):
        run = Run(args)
        code = run.finish()
        lines = [line for line in run.stdout.splitlines() if "resume with:" in line]
        if code != 0:
            return Trial(False, [f"--max-time {limit}", f"exit code {code}: {run.stderr[-300:]}"])
        if not lines:
            break
        stops += 1
        args = [*shlex.split(lines[0].split("resume with: ", 1)[1])[3:], "--max-time", limit]
    else:
        return Trial(False, [f"--max-time {limit}", "not finished after 30 resumes"])
    problems = compare_with_reference(run_dir, reference.run_dir)
    return Trial(not problems, [f"--max-time {limit}: {stops} stops", *problems[:3]])


def trial_checkpoint_write(
    run_dir: Path, config: list[str], reference: Reference, rng: random.Random, epochs: int
) -> Trial:
    """SIGKILL as soon as a random checkpoint file of a random epoch is being written, then finish."""
    epoch = rng.randint(1, epochs)
    name = rng.choice([CHECKPOINT_BEST, CHECKPOINT_LAST]) if reference.improved[epoch - 1] else CHECKPOINT_LAST
    notes = [f"{name} of epoch {epoch}"]
    run = Run([*config, "--log-dir", str(run_dir)])
    run.wait_for(epoch_started(run, epoch, epochs))
    if not run.wait_for(lambda: bool(temporary_files(run_dir, name))):
        run.finish()
        return Trial(False, [*notes, "the run ended without writing it"])
    run.stop()
    if not temporary_files(run_dir, name):
        return Trial(False, [*notes, "missed: the write ended before the kill"])
    if epoch > 1:
        # last.pt is the previous epoch's; best.pt is the recorded best, or this epoch's when it is
        # written first and the kill came during last.pt.
        last = load_checkpoint(run_dir / CHECKPOINT_LAST)
        allowed = {last["callbacks"]["ModelCheckpoint"]["best_epoch"] + 1} | (
            {epoch} if name == CHECKPOINT_LAST else set()
        )
        if last["epochs_done"] != epoch - 1 or load_checkpoint(run_dir / CHECKPOINT_BEST)["epochs_done"] not in allowed:
            return Trial(False, [*notes, f"{CHECKPOINT_LAST} and {CHECKPOINT_BEST} disagree after the kill"])
    # Killed while the first last.pt was written: no checkpoint to resume (refused, started anew).
    return finish_and_compare(run_dir, continue_args(run_dir, config, notes), reference, notes)


def trial_mid_epoch_kill(
    run_dir: Path, config: list[str], reference: Reference, rng: random.Random, epochs: int
) -> Trial:
    """SIGKILL at a random moment of a random epoch (not the last, whose end the kill could miss)
    of a run with step checkpoints, then finish.

    The note says where the last checkpoint was: inside an epoch (the resume starts at its next
    batch) or at an epoch's end.
    """
    epoch = rng.randint(1, epochs - 1)
    run = Run([*config, "--log-dir", str(run_dir)])
    conditions = milestones(run, run_dir, epochs)
    if not wait_random(
        run, conditions[f"epoch {epoch}"], rng.uniform(0.0, reference.gap(f"epoch {epoch}", epochs)), lambda: False
    ):
        run.finish()
        return Trial(False, [f"in epoch {epoch}", "the run ended before the kill"])
    run.stop()
    if not (run_dir / CHECKPOINT_LAST).is_file():
        notes = [where_killed(run_dir, epochs)]
        return finish_and_compare(run_dir, continue_args(run_dir, config, notes), reference, notes)
    return finish_and_compare(run_dir, ["--resume", str(run_dir)], reference, [resume_point(run_dir)])


def trial_before_first_checkpoint(
    run_dir: Path, config: list[str], reference: Reference, rng: random.Random, epochs: int
) -> Trial:
    """SIGKILL at a random moment between config.json and the first checkpoint write: the resume
    is refused without changing anything, and the run started anew finishes as the reference."""
    run = Run([*config, "--log-dir", str(run_dir)])
    conditions = milestones(run, run_dir, epochs)
    span = reference.seen["checkpoint"] - reference.seen["config"]
    if not wait_random(run, conditions["config"], rng.uniform(0.0, span), conditions["checkpoint"]):
        run.finish()
        return Trial(False, ["the run ended before the kill"])
    run.stop()
    if (run_dir / CHECKPOINT_LAST).is_file():
        return Trial(False, ["missed: the first checkpoint was written before the kill"])
    notes = [
        "during the first checkpoint write"
        if temporary_files(run_dir)
        else ("during epoch 1" if conditions["epoch 1"]() else "before epoch 1")
    ]
    return finish_and_compare(run_dir, continue_args(run_dir, config, notes), reference, notes)


# ----------------------------------------------------------------------------------------- one writer
IN_USE = "is in use by another run (pid "


def one_error_line(run: Run) -> str | None:
    """The run's only ``error:`` line, or None when it printed none or several."""
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    return lines[0] if len(lines) == 1 else None


def trial_two_at_once(run_dir: Path, config: list[str], reference: Reference, rng: random.Random, epochs: int) -> Trial:
    """Two runs started together on one new ``--log-dir``: one trains to the end (equal to the
    reference), the other exits with 2 and one line naming the holder of the folder."""
    runs = [Run([*config, "--log-dir", str(run_dir)]) for _ in range(2)]
    codes = [run.finish() for run in runs]
    if sorted(codes) != [0, 2]:
        return Trial(False, [f"exit codes {codes}: {runs[0].stderr[-200:]} {runs[1].stderr[-200:]}"])
    loser = runs[codes.index(2)]
    line = one_error_line(loser)
    if line is None or IN_USE not in line:
        return Trial(False, [f"the second run's error: {loser.stderr.strip()[-300:]!r}"])
    problems = compare_with_reference(run_dir, reference.run_dir)
    return Trial(not problems, [f"run {codes.index(0) + 1} trained", *problems[:3]])


def trial_resume_live(
    run_dir: Path,
    config: list[str],
    reference: Reference,
    rng: random.Random,
    epochs: int,
    lock_removed: bool = False,
) -> Trial:
    """``--resume`` of a run that is still training, at a random epoch's checkpoint: the run is
    paused (SIGSTOP, so it stays alive whatever the timing) once ``last.pt`` records that epoch;
    the resume must exit with 2 naming the holder and change nothing; the run then continues
    (SIGCONT) and finishes equal to the reference. With `lock_removed`, the live run's ``.lock`` is
    moved out of the folder during the resume (the lock holds the folder, not the file) and put
    back before the run continues."""
    epoch = rng.randint(1, epochs - 1)
    run = Run([*config, "--log-dir", str(run_dir)])
    if not run.wait_for(lambda: epochs_done(run_dir) >= epoch if (run_dir / CHECKPOINT_LAST).is_file() else False):
        run.finish()
        return Trial(False, [f"the run ended before its checkpoint of epoch {epoch}"])
    run.process.send_signal(signal.SIGSTOP)
    aside = run_dir.parent / f"{run_dir.name}.lock-aside"
    try:
        if lock_removed:
            (run_dir / ".lock").rename(aside)
        before = snapshot(run_dir)
        resume = Run(["--resume", str(run_dir)])
        code, line = resume.finish(), one_error_line(resume)
        changed = snapshot(run_dir) != before
    finally:
        if lock_removed:
            aside.rename(run_dir / ".lock")
        run.process.send_signal(signal.SIGCONT)
    notes = [f"after epoch {epoch}"]
    if code != 2 or line is None or IN_USE not in line:
        notes.append(f"PROBLEM: the resume exited with {code}: {resume.stderr.strip()[-300:]!r}")
    if changed:
        notes.append("PROBLEM: the refused resume changed the run folder")
    if run.finish() != 0:
        return Trial(False, [*notes, f"the run failed: {run.stderr[-300:]}"])
    problems = compare_with_reference(run_dir, reference.run_dir)
    return Trial(not problems and not any(n.startswith("PROBLEM") for n in notes), notes + problems[:3])


# ----------------------------------------------------------------------------------------- the run's ground moves
def trial_folder_moved(
    run_dir: Path, config: list[str], reference: Reference, rng: random.Random, epochs: int
) -> Trial:
    """The run folder of a live run is renamed once a random epoch (not the last) starts: the run
    must stop at its next look (a validation's or an epoch's end) with exit 2 and one line naming
    where the folder went and the resume command, write nothing at the old path, and that command
    must finish the run equal to the reference."""
    epoch = rng.randint(2, epochs - 1) if epochs > 2 else 2
    moved = run_dir.parent / f"{run_dir.name}-moved"
    run = Run([*config, "--log-dir", str(run_dir)])
    if not run.wait_for(epoch_started(run, epoch, epochs)):
        run.finish()
        return Trial(False, [f"the run ended before epoch {epoch}"])
    run_dir.rename(moved)
    code, line = run.finish(), one_error_line(run)
    notes = [f"moved in epoch {epoch}"]
    command = f"--resume {moved}"
    if code != 2 or line is None or f"was moved to {moved}" not in line or command not in line:
        return Trial(False, [*notes, f"exit {code}: {run.stderr.strip()[-400:]!r}"])
    if run_dir.exists():
        return Trial(False, [*notes, f"PROBLEM: {sorted(p.name for p in run_dir.iterdir())} written at the old path"])
    if (moved / ".lock").exists():
        notes.append("PROBLEM: the lock file was left")
    return finish_and_compare(moved, ["--resume", str(moved)], reference, notes)


#: Runs the recipe and removes every image of the folder given first once epoch START_EPOCH (the
#: second argument) has started, as a user or a clean-up job might while a streamed run trains.
REMOVE_IMAGES = """
import runpy, shutil, sys
from trainer.callbacks import ModelCheckpoint
images, aside, epoch = sys.argv.pop(1), sys.argv.pop(1), int(sys.argv.pop(1))
def on_batch_start(self, trainer, batch, original=ModelCheckpoint.on_batch_start):
    original(self, trainer, batch)
    if trainer.epoch + 1 == epoch and not shutil.os.path.exists(aside):
        shutil.move(images, aside)
ModelCheckpoint.on_batch_start = on_batch_start
ModelCheckpoint.idle_hooks = lambda self, trainer: frozenset()
runpy.run_module("recipes.nested_unet", run_name="__main__", alter_sys=True)
"""


def trial_stream_files_removed(
    run_dir: Path, config: list[str], reference: Reference, rng: random.Random, epochs: int
) -> Trial:
    """A streamed run (``--data-mode stream --workers 2``) whose images vanish at the first batch
    of a random epoch but the first: it must stop within seconds (its workers, which ignore
    SIGTERM, used to keep it from ever exiting), exit 2 with one line naming the file and the
    resume command, its position saved and its lock released. With the files back, that command
    must finish the run equal to the reference."""
    epoch = rng.randint(2, epochs)
    images = Path(config[config.index("--data") + 1]) / "images"
    aside = run_dir.parent / f"{run_dir.name}-images"
    run = Run([str(images), str(aside), str(epoch), *config, "--log-dir", str(run_dir)], code=REMOVE_IMAGES)
    try:
        code, line = run.finish(), one_error_line(run)
        seconds = run.elapsed()
    finally:
        if aside.exists():
            shutil.move(aside, images)
    notes = [f"removed in epoch {epoch}", f"exited after {seconds:.0f} s"]
    if code != 2 or line is None or "was removed after the folder was checked" not in line:
        return Trial(False, [*notes, f"exit {code}: {run.stderr.strip()[-400:]!r}"])
    if f"--resume {run_dir}" not in line or (run_dir / ".lock").exists():
        return Trial(False, [*notes, f"PROBLEM: no resume command or a lock left: {line!r}"])
    return finish_and_compare(run_dir, ["--resume", str(run_dir)], reference, notes)


#: Runs the recipe and prints the process's peak resident memory (MB) at exit.
PEAK_MEMORY = """
import atexit, resource, runpy, sys
atexit.register(lambda: print(f"peak MB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}"))
runpy.run_module("recipes.nested_unet", run_name="__main__", alter_sys=True)
"""


def trial_many_classes(run_dir: Path, classes: int, bound_mb: float) -> Trial:
    """A label-map run with `classes` classes (ADE20K has 150): its confusion-matrix figure has a
    bounded size, so the run finishes and its peak memory stays under `bound_mb`."""
    data = run_dir.parent / f"{run_dir.name}-data"
    generator = torch.Generator().manual_seed(classes)
    for index in range(8):
        image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=generator)
        write_png_file(image, data / "images" / f"{index}.png")
        write_label_map(torch.randint(0, classes, (32, 32), generator=generator), data / "masks" / f"{index}.png")
    (data / "classes.txt").write_text("".join(f"class{i}\n" for i in range(classes)))
    args = [
        "--data",
        str(data),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--ignore-index",
        "65535",
        "--log-dir",
        str(run_dir),
    ]
    run = Run([*args, "--precision", "32", "--device", "cpu"], code=PEAK_MEMORY)
    code = run.finish()
    peak = [float(line.split()[-1]) for line in run.stdout.splitlines() if line.startswith("peak MB ")]
    if code != 0 or not peak:
        return Trial(False, [f"exit {code}: {run.stderr.strip()[-400:]!r}"])
    return Trial(peak[0] < bound_mb, [f"peak {peak[0]:.0f} MB (bound {bound_mb:.0f} MB)"])


# ----------------------------------------------------------------------------------------- a shared machine
def trial_board_other_user(run_dir: Path, reference: Reference) -> Trial:
    """Another user (uid 65534) made the board's server registry folder first, in a shared TMPDIR:
    ``python -m trainer.board`` must refuse in one line naming it, start nothing and leave the
    folder as it was."""
    shared = run_dir / "tmp"
    shared.mkdir(parents=True)
    shared.chmod(0o1777)
    registry = shared / f"trainer-board-servers-{os.getuid()}"
    registry.mkdir(mode=0o755)
    (registry / "planted.json").write_text('{"path": "/", "pid": 1, "port": 1}')
    os.chown(registry, 65534, 65534)
    before = snapshot(registry)
    result = subprocess.run(
        [sys.executable, "-m", "trainer.board", str(reference.run_dir)],
        env={**checkout_env(), "TMPDIR": str(shared)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = result.stderr.strip()
    expected = f"registry {registry} belongs to uid 65534"
    ok = result.returncode == 2 and "\n" not in line and expected in line and snapshot(registry) == before
    return Trial(ok, [] if ok else [f"exit {result.returncode}: {line[-400:]!r}"])


STOP_ALL = "from trainer.board import stop_all; stop_all()"


def trial_board_planted_pid(run_dir: Path) -> Trial:
    """An entry in this user's own registry names the pid of another process of the user (a
    ``sleep``), as a planted or stale entry might: ``stop_all`` must not end it (only a process
    proven to be that folder's board server is stopped) and must drop the entry."""
    shared = run_dir / "tmp"
    shared.mkdir(parents=True)
    registry = shared / f"trainer-board-servers-{os.getuid()}"
    registry.mkdir(mode=0o700)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        entry = {
            "path": str(run_dir),
            "pid": bystander.pid,
            "port": 1,
            "host": "127.0.0.1",
            "url": "http://127.0.0.1:1/",
        }
        planted = registry / "planted.json"
        planted.write_text(json.dumps(entry))
        planted.chmod(0o600)
        result = subprocess.run(
            [sys.executable, "-c", STOP_ALL],
            env={**checkout_env(), "TMPDIR": str(shared)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        alive = bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
    ok = result.returncode == 0 and alive and not planted.exists()
    notes = [] if ok else [f"exit {result.returncode}, bystander alive: {alive}: {result.stderr.strip()[-300:]!r}"]
    return Trial(ok, notes)


# ----------------------------------------------------------------------------------------- full disk
def fill(path: Path) -> None:
    """Write zeros to `path` until its file system is full."""
    with open(path, "wb", buffering=0) as file:
        for block in (bytes(1 << 20), bytes(4096)):  # megabytes, then what is left of the last one
            with contextlib.suppress(OSError):
                while True:
                    file.write(block)


def trial_full_disk(run_dir: Path, config: list[str], reference: Reference, rng: random.Random, epochs: int) -> Trial:
    """The run's file system (a 400 MiB tmpfs mounted for the trial: room for the checkpoints of
    these runs, about 94 MB each) filled up at a random moment in the first quarter of the epoch after
    the checkpoint of a random epoch (not the last): one ``error:`` line naming the path and the last good
    checkpoint, exit 2, no temporary file left, ``last.pt`` readable; resumed after the space is
    freed, the run ends equal to the reference."""
    mount = run_dir.parent / f"{run_dir.name}-tmpfs"
    mount.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(mount)], capture_output=True).returncode:
        return Trial(False, ["mount -t tmpfs failed"])
    try:
        run_dir = mount / "run"
        epoch = rng.randint(1, epochs - 1)
        length = (reference.seen[f"epoch {epochs}"] - reference.seen["epoch 1"]) / (epochs - 1)
        run = Run([*config, "--log-dir", str(run_dir)])
        if not wait_random(
            run,
            lambda: (run_dir / CHECKPOINT_LAST).is_file() and epochs_done(run_dir) >= epoch,
            rng.uniform(0.0, length / 4),
            lambda: False,
        ):
            run.finish()
            return Trial(
                False,
                [
                    f"the run ended before the disk filled (epoch {epoch}, exit {run.process.returncode}): "
                    f"{run.stderr[-300:]}"
                ],
            )
        fill(mount / "filler")
        code, line = run.finish(), one_error_line(run)
        if code == 0:
            return Trial(False, [f"after epoch {epoch}: missed, the run wrote its last file before the disk was full"])
        notes = [f"after epoch {epoch}"]
        if code != 2 or line is None or "No space left on device" not in line or "last good checkpoint" not in line:
            return Trial(False, [*notes, f"exit {code}: {run.stderr.strip()[-300:]!r}"])
        notes.append("stopped at " + line.split("cannot write ", 1)[-1].split(":", 1)[0].replace(str(run_dir), "RUN"))
        if temporary_files(run_dir) or list(run_dir.glob(".*.tmp")) or list(run_dir.glob("*.tmp")):
            return Trial(False, [*notes, "a temporary file was left"])
        (mount / "filler").unlink()
        return finish_and_compare(run_dir, ["--resume", str(run_dir)], reference, notes)
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


# ----------------------------------------------------------------------------------------- reproducible
def trial_default_under_load(
    run_dir: Path, config: list[str], reference: Reference, rng: random.Random, epochs: int
) -> Trial:
    """Two runs of the default precision, layout and threads with one seed and a fresh precision
    cache: the first on the idle machine, the second beside a CPU-bound process; the weights,
    history and curves of both must be identical."""
    cache = run_dir.parent / f"{run_dir.name}-cache"
    previous = os.environ.get("TRAINER_CACHE_DIR")
    os.environ["TRAINER_CACHE_DIR"] = str(cache)  # inherited by the runs
    try:
        first = Run([*config, "--log-dir", str(run_dir / "idle")])
        if first.finish() != 0:
            return Trial(False, [f"the idle run failed: {first.stderr[-300:]}"])
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            second = Run([*config, "--log-dir", str(run_dir / "busy")])
            code = second.finish()
        finally:
            busy.kill()
            busy.wait()
    finally:
        if previous is None:
            del os.environ["TRAINER_CACHE_DIR"]
        else:
            os.environ["TRAINER_CACHE_DIR"] = previous
    if code != 0:
        return Trial(False, [f"the run beside the load failed: {second.stderr[-300:]}"])
    choices = []
    for run in (first, second):
        line = next((line for line in run.stdout.splitlines() + run.stderr.splitlines() if "precision:" in line), "")
        precision = line.split("precision: ", 1)[-1].split(" (", 1)[0]
        threads = next((part.split(" (", 1)[0] for part in line.split("; ") if " thread" in part), "?")
        choices.append(f"{precision}, {threads}")
    problems = compare_with_reference(run_dir / "busy", run_dir / "idle", described=["precision_reason"])
    notes = [f"both: {choices[0]}" if choices[0] == choices[1] else f"idle: {choices[0]}; busy: {choices[1]}"]
    return Trial(not problems, notes + problems[:3])


# ----------------------------------------------------------------------------------------- bad input
class BadInput(NamedTuple):
    """A command line with one fault and the text its error line must contain; `code` runs
    instead of ``recipes.nested_unet`` (`FASHION`). A training command line gets a fresh
    ``--log-dir`` where it names none (`takes_log_dir`)."""

    fault: str
    args: list[str]
    expected: str
    code: str | None = None


def fashion_fault(fault: str, data_dir: Path, expected: str) -> BadInput:
    """A fault of ``recipes.fashion_mnist`` training one epoch on the data folder `data_dir`."""
    return BadInput(f"Fashion-MNIST: {fault}", ["--data-dir", str(data_dir), "--epochs", "1"], expected, code=FASHION)


def takes_log_dir(args: list[str]) -> bool:
    """Whether the command line `args` trains into a new run folder, so takes ``--log-dir``: not a
    predict, nor a ``--resume`` (which writes into the run it resumes)."""
    return args[0] != "predict" and "--resume" not in args


def predict_args(predict: list[str], checkpoint: Path, out: Path, images: Path | None = None) -> list[str]:
    """The predict command line `predict` with `checkpoint` (and `images`) for its own, writing into `out`."""
    args = [*predict, "--out", str(out)]
    for option, value in (("--checkpoint", checkpoint), ("--images", images)):
        if value is not None:
            args[args.index(option) + 1] = str(value)
    return args


def fashion_folder(root: Path, damage: Callable[[Path], None]) -> Path:
    """A Fashion-MNIST folder of small uncompressed IDX files under `root`, its
    ``train-images-idx3-ubyte`` or labels file then damaged by `damage` (given the raw folder)."""
    for train, samples in ((True, 20), (False, 10)):
        for packed in write_fashion_mnist_idx(
            root, *make_learnable_fashion_like(samples, seed=int(train)), train=train
        ):
            packed.with_suffix("").write_bytes(gzip.decompress(packed.read_bytes()))
            packed.unlink()
    damage(raw_folder(root))
    return root


def hostile_checkpoint(root: Path, name: str, state: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of the checkpoint `state` changed by `change`, saved as `root / name`."""
    changed = copy.deepcopy(state)
    change(changed)
    torch.save(changed, root / name)
    return root / name


class RunsACommand:
    """What a malicious pickle holds: unpickling it would run ``touch`` on `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def hostile_inputs(root: Path, checkpoint: Path, predict: list[str]) -> list[BadInput]:
    """Files that come from someone else, built to do harm: checkpoints whose class names lead out of
    ``--out``, whose sizes would take all memory, that run code or inflate; a ``classes.txt`` line
    ``..``; a ``.lock`` that links to another file; a weights-only ``last.pt``; a ``.gz`` bomb."""
    root.mkdir(parents=True)
    state = load_checkpoint(checkpoint)

    def predicting(name: str, change: Callable[[dict[str, Any]], None]) -> list[str]:
        return predict_args(predict, hostile_checkpoint(root, name, state, change), root / f"out-{name}")

    def nested(spec: dict[str, Any]) -> None:
        value: Any = 1
        for _ in range(150):
            value = [value]
        spec["model_spec"]["kwargs"]["extra"] = value

    def linear(spec: dict[str, Any]) -> None:  # 1.6 GB of weights named, none stored
        spec["model_spec"] = {"class": "models.unet.UNet", "args": [], "kwargs": {"base_filters": 20000}}

    marker = root / "code-ran"
    (root / "pickle.pt").write_bytes(pickle.dumps({"format_version": 2, "model": RunsACommand(marker)}, protocol=2))
    plain = root / "plain.pt"
    torch.save(state, plain)
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(root / "deflated.pt", "w", zipfile.ZIP_DEFLATED) as packed:
        for info in source.infolist():
            packed.writestr(info.filename, source.read(info))
    labels = root / "dot-classes"
    SyntheticNuclei(6, image_size=16, seed=1).save(labels)
    for mask in sorted((labels / "masks" / "0").iterdir()):
        mask.rename(labels / "masks" / mask.name)
    (labels / "masks" / "0").rmdir()
    (labels / "classes.txt").write_text("background\n..\n")
    weights_only, linked = root / "weights-only", root / "linked-lock"
    for run_dir in (weights_only, linked):
        shutil.copytree(checkpoint.parent, run_dir, ignore=shutil.ignore_patterns(".lock"))
    export_model(checkpoint, weights_only / CHECKPOINT_LAST)
    (root / "victim.txt").write_text("not a lock")
    (linked / ".lock").symlink_to(root / "victim.txt")
    unlabelled = root / "unlabelled"
    for index in range(6):
        write_png_file(torch.full((3, 16, 16), 128, dtype=torch.uint8), unlabelled / "images" / f"{index}.png")
        write_label_map(torch.full((16, 16), 255), unlabelled / "masks" / f"{index}.png")
    (unlabelled / "classes.txt").write_text("background\ncell\n")
    two_classes = UNet(num_classes=2, input_channels=3, base_filters=32)
    two = {"classes": ["cell", "nucleus"], "image_size": 16, "input_channels": 3, "mask_type": "binary"}
    pair = root / "two-classes.pt"
    torch.save({**state, "model": two_classes.state_dict(), "model_spec": record_model(two_classes), "data": two}, pair)
    clashing = root / "clashing"
    for name in ("cell", "cell_prob"):
        write_png_file(torch.full((3, 16, 16), 128, dtype=torch.uint8), clashing / f"{name}.png")
    bomb = root / "fashion-bomb"
    for train, samples in ((True, 20), (False, 10)):
        write_fashion_mnist_idx(bomb, *make_learnable_fashion_like(samples, seed=int(train)), train=train)
    packed_images = raw_folder(bomb) / "train-images-idx3-ubyte.gz"
    packed_images.write_bytes(gzip.compress(gzip.decompress(packed_images.read_bytes()) + bytes(200 << 20), 1))
    return [
        BadInput(
            "predict: a checkpoint whose class name is '../escape'",
            predicting("dotdot.pt", lambda s: s["data"].update(classes=["../escape"])),
            "records the class name '../escape' (class 0), which holds a path separator",
        ),
        BadInput(
            "predict: a checkpoint whose class name is an absolute path",
            predicting("absolute.pt", lambda s: s["data"].update(classes=[str(root / "elsewhere")])),
            "which holds a path separator '/'",
        ),
        BadInput(
            "predict: a checkpoint naming 3 classes for a 1-map model",
            predicting("count.pt", lambda s: s["data"].update(classes=["a", "b", "c"])),
            "records 3 class names (a, b, c) for a model that predicts 1 map",
        ),
        BadInput(
            "predict: a checkpoint whose model_spec asks for base_filters 10**7",
            predicting("filters.pt", lambda s: s["model_spec"]["kwargs"].update(base_filters=10**7)),
            "'base_filters' of UNet is 10000000, above 1048576",
        ),
        BadInput(
            "predict: a checkpoint naming a UNet of 20000 base filters (1e11 weights), none stored",
            predicting("wide.pt", linear),
            "do not fit UNet built from its model_spec: conv0_0.conv1.weight is (32, 3, 3, 3) in the file",
        ),
        BadInput(
            "predict: a checkpoint whose image_size is 10**6",
            predicting("image-size.pt", lambda s: s["data"].update(image_size=10**6)),
            "gives image_size 1000000 in its data",
        ),
        BadInput(
            "predict: a model_spec nested 150 levels deep",
            predicting("nested.pt", nested),
            "nested more than 100 levels deep",
        ),
        BadInput(
            "predict: a pickle whose loading would call os.system",
            predict_args(predict, root / "pickle.pt", root / "out-pickle"),
            "refused as unsafe",
        ),
        BadInput(
            "predict: a checkpoint re-packed with compressed records (a zip bomb's shape)",
            predict_args(predict, root / "deflated.pt", root / "out-deflated"),
            "records are compressed",
        ),
        BadInput(
            "predict, 2 classes: images cell.png and cell_prob.png (one's probability map, the other's mask)",
            predict_args(predict, pair, root / "out-clash", images=clashing),
            "is planned twice",
        ),
        BadInput(
            "label maps with no labelled pixel (every pixel the ignore index)",
            ["--data", str(unlabelled), "--epochs", "1"],
            "hold no labelled pixel",
        ),
        BadInput("classes.txt with a line '..'", ["--data", str(labels), "--epochs", "1"], "line 2 ('..') is '..'"),
        BadInput(
            "--resume of a run whose last.pt is an exported weights-only file",
            ["--resume", str(weights_only)],
            "holds a weights-only checkpoint",
        ),
        BadInput(
            "--resume of a run whose .lock is a symbolic link to another file",
            ["--resume", str(linked)],
            ".lock is a symbolic link",
        ),
        BadInput("--threads 100000", ["--threads", "100000"], "argument --threads: expected 1 to"),
        fashion_fault(
            "a .gz bomb (200 MB of zeros behind a 20-image header)",
            bomb,
            "holds more than the 15696 bytes its header declares",
        ),
    ]


def bad_inputs(root: Path, checkpoint: Path) -> list[BadInput]:
    """The bad-input faults, with the data folders they need written under `root`; `checkpoint`
    is a finished run's ``best.pt`` (for predict)."""

    def folder(name: str, samples: int = 6) -> Path:
        path = root / name
        SyntheticNuclei(samples, image_size=16, seed=1).save(path)
        return path

    empty = root / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    unpaired = folder("unpaired")
    (unpaired / "masks" / "0" / "0002.png").unlink()
    truncated = folder("truncated")
    image = (truncated / "images" / "0001.png").read_bytes()
    (truncated / "images" / "0001.png").write_bytes(image[: len(image) // 2])
    damaged = folder("damaged")
    (damaged / "images" / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    colour_coded = folder("colour_coded")
    colours = torch.zeros(3, 16, 16, dtype=torch.uint8)
    colours[0, :5], colours[1, 10:] = 255, 255  # a red and a green class in one mask
    write_png_file(colours, colour_coded / "masks" / "0" / "0003.png")
    wrong_size = folder("wrong_size")
    write_png_file(torch.zeros(1, 8, 8, dtype=torch.uint8), wrong_size / "masks" / "0" / "0004.png")
    mixed = folder("mixed")
    big = SyntheticNuclei(3, image_size=32, seed=2, offset=100)
    for i in range(len(big)):
        big_image, big_mask = big[i]
        write_png_file(big_image.mul(255).round().to(torch.uint8), mixed / "images" / f"big{i}.png")
        write_png_file(big_mask.to(torch.uint8) * 255, mixed / "masks" / "0" / f"big{i}.png")
    if os.geteuid() == 0:  # root may write into read-only folders: put the log folder under a file
        (root / "a-file").write_text("")
        unwritable, how = root / "a-file" / "run", "under a file"
    else:
        (root / "read-only").mkdir(mode=0o555)
        unwritable, how = root / "read-only" / "run", "in a read-only folder"
    fifo = folder("fifo")
    (fifo / "images" / "0001.png").unlink()
    os.mkfifo(fifo / "images" / "0001.png")
    no_last = root / "no-last" / "run"
    no_last.mkdir(parents=True)
    shutil.copy(checkpoint.parent / "config.json", no_last / "config.json")
    state = load_checkpoint(checkpoint)
    other = root / "other-recipe.pt"  # what a recipes.fashion_mnist run records
    fashion = {"epochs": 2, "batch_size": 4, "lr": 0.001, "momentum": 0.9, "seed": 0}
    cnn = FashionCNN()
    fashion_data = {"classes": list(FASHION_CLASSES), "image_size": 28, "input_channels": 1}
    torch.save(
        {**state, "model": cnn.state_dict(), "model_spec": record_model(cnn), "data": fashion_data, "config": fashion},
        other,
    )
    not_dict = root / "list.pt"
    torch.save([state["model"]], not_dict)
    pictures = folder("pictures") / "images"
    predicted = root / "predicted"
    predict = ["predict", "--checkpoint", str(checkpoint), "--images", str(pictures), "--device", "cpu"]
    first = Run([*predict, "--out", str(predicted)])
    if first.finish() != 0:
        raise SystemExit(f"predict failed:\n{first.stderr[-3000:]}")

    def truncate(raw: Path) -> None:
        path = raw / "train-images-idx3-ubyte"
        path.write_bytes(path.read_bytes()[:1000])

    def wrong_magic(raw: Path) -> None:
        path = raw / "train-labels-idx1-ubyte"
        path.write_bytes(b"PK\x03\x04" + path.read_bytes()[4:])

    truncated_idx = fashion_folder(root / "fashion-truncated", truncate)
    magic_idx = fashion_folder(root / "fashion-magic", wrong_magic)
    data = ["--epochs", "1", "--batch-size", "4"]
    images, masks = "images", Path("masks") / "0"

    def on_data(fault: str, folder: Path, expected: str) -> BadInput:
        """A fault of training one epoch on the data folder `folder`."""
        return BadInput(fault, ["--data", str(folder), *data], expected)

    faults = [
        on_data("missing data folder", root / "nope", f"{root / 'nope'} does not exist"),
        on_data("empty data folder", empty, f"no images in {empty / images}"),
        on_data("unpaired files", unpaired, "images without a mask in every class: images/0002.png"),
        on_data("corrupt image (truncated PNG)", truncated, f"cannot decode {truncated / images / '0001.png'}"),
        on_data(
            "corrupt image (PNG signature, broken header)", damaged, f"cannot decode {damaged / images / '0001.png'}"
        ),
        on_data("colour-coded mask", colour_coded, f"mask {colour_coded / masks / '0003.png'} is colour-coded"),
        on_data("mask of the wrong size", wrong_size, f"mask {wrong_size / masks / '0004.png'} is 8x8"),
        on_data("mixed image sizes without --image-size", mixed, "images have different sizes"),
        BadInput("--epochs 0", ["--epochs", "0"], "argument --epochs: expected a positive integer"),
        BadInput("--batch-size 0", ["--batch-size", "0"], "argument --batch-size: expected a positive integer"),
        BadInput("--lr 0", ["--lr", "0"], "argument --lr: expected a positive number"),
        BadInput("unknown --arch", ["--arch", "ResNet"], "argument --arch: invalid choice: 'ResNet'"),
        BadInput("unknown --optimizer", ["--optimizer", "rmsprop"], "argument --optimizer: invalid choice"),
        BadInput("unknown --scheduler", ["--scheduler", "step"], "argument --scheduler: invalid choice"),
        BadInput(
            f"unwritable --log-dir ({how})",
            ["--train-samples", "8", "--val-samples", "4", *data, "--log-dir", str(unwritable)],
            f"cannot create the log directory '{unwritable}'",
        ),
        BadInput("--image-size 30 (not a multiple of 16)", ["--image-size", "30"], "not a multiple of 16; try 32"),
        on_data("a FIFO in images/", fifo, "a FIFO"),
        BadInput("--device meta", ["--device", "meta"], "argument --device: expected"),
        BadInput("--seed 99999999999999999999999", ["--seed", "99999999999999999999999"], "argument --seed"),
        BadInput("--lr 1e300", ["--lr", "1e300"], "argument --lr: expected a positive number up to"),
        fashion_fault(
            "truncated IDX images file", truncated_idx, "train-images-idx3-ubyte is not a valid IDX images file"
        ),
        fashion_fault(
            "IDX labels file with a wrong magic number",
            magic_idx,
            "train-labels-idx1-ubyte is not a valid IDX labels file",
        ),
        BadInput(
            "--resume of a folder without last.pt (only config.json)",
            ["--resume", str(no_last)],
            f"no {CHECKPOINT_LAST}",
        ),
        BadInput(
            "predict: a checkpoint of another recipe",
            predict_args(predict, other, root / "out-other"),
            "(a checkpoint of FashionCNN) takes 1-channel inputs; predict feeds RGB images",
        ),
        BadInput(
            "predict: a checkpoint that is not a dict",
            predict_args(predict, not_dict, root / "out-list"),
            str(not_dict),
        ),
        BadInput(
            "predict --out onto existing outputs, no --overwrite",
            [*predict, "--out", str(predicted)],
            "already holds",
        ),
        BadInput(
            "predict --out inside a training data folder",
            [*predict, "--out", str(fifo / "masks" / "0")],
            f"{fifo}",
        ),
    ]
    if not torch.cuda.is_available():
        faults.append(BadInput("--device cuda without a GPU", ["--device", "cuda"], "no CUDA GPU is available"))
    return faults + hostile_inputs(root / "hostile", checkpoint, predict)


def check_bad_input(fault: BadInput, log_dir: Path) -> list[str]:
    """Run one faulty command line; problems with its exit code, message or writes."""
    args = fault.args
    if takes_log_dir(args) and "--log-dir" not in args:
        args = [*args, "--log-dir", str(log_dir)]
    watched = [
        Path(args[args.index(option) + 1])
        for option in ("--log-dir", "--data", "--data-dir", "--resume", "--out", "--checkpoint")
        if option in args
    ]
    before = {path: snapshot(path) for path in watched}
    run = Run(args, code=fault.code)
    code = run.finish()
    message = run.stderr
    problems = []
    if code != 2:
        problems.append(f"exit code {code}")
    if message.count("\n") != 1 or not message.endswith("\n"):
        problems.append(
            f"{message.count(chr(10))} lines on stderr, the first {message.splitlines()[0]!r}"
            if message
            else "nothing on stderr"
        )
    if fault.expected not in message:
        problems.append(f"message {message.strip()!r} lacks {fault.expected!r}")
    if any(snapshot(path) != before[path] for path in watched):
        problems.append("files were written")
    return problems


def snapshot(path: Path) -> list[tuple[str, int, int]]:
    """Names, sizes and modification times of everything under `path` (empty when it does not
    exist; -1 for folders and other non-files)."""

    def entry(p: Path, name: str) -> tuple[str, int, int]:
        stat = p.stat()
        return (name, stat.st_size, stat.st_mtime_ns) if p.is_file() else (name, -1, -1)

    if not path.exists():
        return []
    if not path.is_dir():
        return [entry(path, path.name)]
    return sorted(entry(p, str(p.relative_to(path))) for p in path.rglob("*"))


# ----------------------------------------------------------------------------------------- main
def summary(results: list[Trial], success: str) -> str:
    """``<success>: k/n`` and a count of the notes, e.g. where the kills landed."""
    passed = sum(trial.ok for trial in results)
    notes = Counter(note for trial in results for note in trial.notes)
    shown = ", ".join(f"{note}: {count}" if count > 1 else note for note, count in notes.most_common())
    return f"{success}: {passed}/{len(results)}" + (f" ({shown})" if shown else "")


def main(argv: list[str] | None = None) -> int:
    """Run every fault, print the Markdown table, return 0 when all trials passed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=2, help="trials per interruption fault (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random moments (default: %(default)s)")
    add_arch_option(parser, "network of the interrupted runs")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the interrupted runs (default: %(default)s)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one trial of each fault whose outcome does not depend on timing (two runs at once, "
        "resume of a live run, full disk, runs under load), --trials of the others",
    )
    parser.add_argument(
        "--bad-input-only",
        action="store_true",
        help="only the bad and hostile inputs (after the one reference run whose checkpoint they use)",
    )
    args = parser.parse_args(argv)
    if args.trials < 1 or args.epochs < 2:
        parser.error("--trials must be >= 1 and --epochs >= 2")

    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # its reader reports every purge it applies
    rng = random.Random(args.seed)
    config = tiny_config(args.arch, args.epochs)
    rows: list[tuple[str, int, str]] = []
    all_ok = True
    with tempfile.TemporaryDirectory(prefix="bench-reliability-") as tmp:
        root = Path(tmp)
        started = time.monotonic()
        reference = run_reference(root, config, args.epochs)
        if args.bad_input_only:
            all_ok &= bad_input_rows(root, reference, rows)
            return report(args, config, started, rows, all_ok)
        mid_config = mid_epoch_config(args.arch, args.epochs)
        mid_reference = run_reference(root, mid_config, args.epochs, "reference-mid-epoch")
        data = SyntheticNuclei(20, image_size=16, seed=1).save(root / "nuclei")
        workers = workers_config(args.arch, args.epochs, data)
        workers_reference = run_reference(root, workers, args.epochs, "reference-workers")
        stream = [*workers, "--data-mode", "stream"]
        stream_reference = run_reference(root, stream, args.epochs, "reference-stream")
        progress(
            f"reference runs: {reference.seen['end']:.1f} s, with step checkpoints "
            f"{mid_reference.seen['end']:.1f} s, with --data and 2 workers {workers_reference.seen['end']:.1f} s, "
            f"streamed {stream_reference.seen['end']:.1f} s"
        )
        same = "state bit-identical, same curves, no duplicated steps"
        success = "resumed, " + same
        stopped = "one stopping line, one resume line, " + success
        once = 1 if args.quick else args.trials
        interruptions: list[tuple[str, Callable[[Path], Trial], str, int]] = [
            (
                "SIGKILL at random moments (2 per trial)",
                lambda d: trial_random_kills(d, config, reference, rng, args.epochs),
                success,
                args.trials,
            ),
            (
                "SIGTERM during training",
                lambda d: trial_signal(d, config, reference, rng, signal.SIGTERM, args.epochs),
                "exit 143, " + stopped,
                args.trials,
            ),
            (
                "SIGINT during training",
                lambda d: trial_signal(d, config, reference, rng, signal.SIGINT, args.epochs),
                "exit 130, " + stopped,
                args.trials,
            ),
            (
                "SIGTERM to the process group, --data with augmentation, --workers 2",
                lambda d: trial_signal(d, workers, workers_reference, rng, signal.SIGTERM, args.epochs, group=True),
                "exit 143, " + stopped,
                args.trials,
            ),
            (
                "SIGINT to the process group, --data with augmentation, --workers 2",
                lambda d: trial_signal(d, workers, workers_reference, rng, signal.SIGINT, args.epochs, group=True),
                "exit 130, " + stopped,
                args.trials,
            ),
            (
                "SIGINT during the end-of-epoch validation, --workers 2",
                lambda d: trial_validation_signal(d, workers, workers_reference, rng, args.epochs),
                "exit 130, " + stopped,
                args.trials,
            ),
            (
                "--max-time stops, resumed each time, --workers 2",
                lambda d: trial_time_limit(d, workers, workers_reference, rng, args.epochs),
                "exit 0 with a resume line at each stop, " + success,
                args.trials,
            ),
            (
                "SIGKILL during a checkpoint write",
                lambda d: trial_checkpoint_write(d, config, reference, rng, args.epochs),
                success,
                args.trials,
            ),
            (
                "SIGKILL inside an epoch with step checkpoints",
                lambda d: trial_mid_epoch_kill(d, mid_config, mid_reference, rng, args.epochs),
                success,
                args.trials,
            ),
            (
                "SIGKILL before the first checkpoint",
                lambda d: trial_before_first_checkpoint(d, config, reference, rng, args.epochs),
                "resume refused (exit 2, folder unchanged), started anew, " + same,
                args.trials,
            ),
            (
                "two runs started at once on one --log-dir",
                lambda d: trial_two_at_once(d, config, reference, rng, args.epochs),
                "one trained (" + same + "), the other exit 2 naming the holder",
                once,
            ),
            (
                "--resume of a live run (paused after a random epoch)",
                lambda d: trial_resume_live(d, config, reference, rng, args.epochs),
                "exit 2 naming the holder, folder unchanged; the run finished, " + same,
                once,
            ),
            (
                "--resume of a live run whose .lock was removed (paused after a random epoch)",
                lambda d: trial_resume_live(d, config, reference, rng, args.epochs, lock_removed=True),
                "exit 2 naming the holder, folder unchanged; the run finished, " + same,
                once,
            ),
            (
                "run folder moved while the run trains",
                lambda d: trial_folder_moved(d, config, reference, rng, args.epochs),
                "exit 2, one line naming the new place and the resume command, nothing at the old path; " + success,
                args.trials,
            ),
            (
                "streamed images removed during training, --workers 2",
                lambda d: trial_stream_files_removed(d, stream, stream_reference, rng, args.epochs),
                "exit 2 at once, one line naming the file and the resume command, lock released; files put back, "
                + success,
                args.trials,
            ),
            (
                "label maps of 300 classes (the confusion-matrix figure)",
                lambda d: trial_many_classes(d, 300, bound_mb=2000),
                "finished",
                1,
            ),
            (
                "board registry folder made first by another user (uid 65534) in a shared TMPDIR",
                lambda d: trial_board_other_user(d, reference),
                "python -m trainer.board: exit 2, one line naming the folder, nothing started or changed",
                1,
            ),
            (
                "board registry entry naming a pid of another process of the user",
                trial_board_planted_pid,
                "stop_all left the process running and removed the entry",
                1,
            ),
            (
                "full disk (tmpfs filled after a random epoch)",
                lambda d: trial_full_disk(d, config, reference, rng, args.epochs),
                "exit 2, one line naming the path and the last good checkpoint, no temporary file; " + success,
                once,
            ),
            (
                "default precision, layout, threads: same seed idle and beside a CPU-bound process",
                lambda d: trial_default_under_load(
                    d, default_config(args.arch, args.epochs), reference, rng, args.epochs
                ),
                "identical weights, history and curves",
                once,
            ),
        ]
        for fault, trial, outcome, count in interruptions:
            if fault.startswith("full disk") and os.geteuid() != 0:
                rows.append((fault, 0, "skipped: needs root (mount -t tmpfs)"))
                continue
            if "another user" in fault and os.geteuid() != 0:
                rows.append((fault, 0, "skipped: needs root (to give a folder to another user)"))
                continue
            results = []
            for index in range(count):
                result = trial(root / f"{fault.split()[0].strip('-')}-{len(rows)}-{index}")
                progress(f"{fault} #{index + 1}: {'ok' if result.ok else 'FAILED'} {result.notes}")
                results.append(result)
            all_ok &= all(r.ok for r in results)
            rows.append((fault, len(results), summary(results, outcome)))
        all_ok &= bad_input_rows(root, reference, rows)
        return report(args, config, started, rows, all_ok)


def bad_input_rows(root: Path, reference: Reference, rows: list[tuple[str, int, str]]) -> bool:
    """Run every bad input against `reference`'s checkpoint, add a row each; True when all passed."""
    all_ok = True
    for index, fault in enumerate(bad_inputs(root / "data", reference.run_dir / CHECKPOINT_BEST)):
        problems = check_bad_input(fault, root / "bad-input" / str(index))
        progress(f"{fault.fault}: {'ok' if not problems else problems}")
        all_ok &= not problems
        rows.append(
            (
                fault.fault,
                1,
                "exit 2, one line naming it, nothing written: "
                + ("1/1" if not problems else f"0/1 ({'; '.join(problems)})"),
            )
        )
    if (root / "data" / "hostile" / "code-ran").exists():
        rows.append(("the malicious pickle's command", 1, "0/1 (it ran)"))
        all_ok = False
    return all_ok


def report(
    args: argparse.Namespace, config: list[str], started: float, rows: list[tuple[str, int, str]], all_ok: bool
) -> int:
    """Print the Markdown table of `rows`; 0 when every trial passed, else 1."""
    minutes = (time.monotonic() - started) / 60
    only = " --bad-input-only" if args.bad_input_only else ""
    print(
        f"`python -m bench.reliability --trials {args.trials} --seed {args.seed} --arch {args.arch} "
        f"--epochs {args.epochs}{' --quick' if args.quick else ''}{only}`: runs of `{' '.join(config)}`, "
        f"{minutes:.1f} min\n"
    )
    print("| fault | trials | outcome |")
    print("|---|---|---|")
    for fault, trials, outcome in rows:
        outcome = " ".join(outcome.replace("|", "\\|").split())  # one table cell, whatever the notes hold
        print(f"| {fault} | {trials} | {outcome} |")
    return 0 if all_ok else 1


def progress(line: str) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
