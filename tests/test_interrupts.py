"""`recipes.interrupts`: a stop signal during training finishes the step, saves and exits with
128 + the signal; after SIGHUP (a terminal that closed), without a terminal to print on.

These run the recipe's command line in this process and send the signal to this process from
inside the run (at a chosen step), so the handler runs exactly as in a real process. Signals to a
real process and its process group are test_kill_resume.py's.
"""

from __future__ import annotations

import io
import os
import signal
import sys

import pytest

from recipes import nested_unet
from recipes.cli import run_cli
from tests.helpers import tiny_args
from trainer.callbacks import ModelCheckpoint
from trainer.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="needs POSIX signals")

#: 4 training steps per epoch, 2 epochs.
OPTIONS = tiny_args(train_samples=16, epochs=2)


def at_step(step: int, action):
    """A `ModelCheckpoint.on_batch_end` that calls ``action()`` once global step `step` is done."""
    original = ModelCheckpoint.on_batch_end

    def on_batch_end(self, trainer, batch, outputs):
        original(self, trainer, batch, outputs)
        if trainer.global_step == step:
            action()

    return on_batch_end


@pytest.fixture
def terminal(monkeypatch):
    """A pseudo-terminal, as in an SSH session: ``attach()`` puts standard error on it (in the
    test's own phase: pytest sets its capture at the start of each phase), ``close()`` hangs it
    up, as a dropped connection does (every later write to it fails with EIO)."""
    master, follower = os.openpty()

    class Terminal:
        open, saved = True, None

        def attach(self) -> None:
            self.saved = os.dup(2)
            os.dup2(follower, 2)
            stream = io.TextIOWrapper(open(2, "wb", buffering=0, closefd=False), write_through=True)
            monkeypatch.setattr(sys, "stderr", stream)

        def close(self) -> None:
            os.close(master)
            self.open = False

    terminal = Terminal()
    yield terminal
    if terminal.saved is not None:
        os.dup2(terminal.saved, 2)
        os.close(terminal.saved)
    os.close(follower)
    if terminal.open:
        os.close(master)


def test_a_signal_saves_the_step_and_prints_the_resume_command(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    monkeypatch.setattr(ModelCheckpoint, "on_batch_end", at_step(2, lambda: os.kill(os.getpid(), signal.SIGTERM)))
    monkeypatch.setattr(ModelCheckpoint, "idle_hooks", lambda self, trainer: frozenset())
    assert run_cli(nested_unet.main, [*OPTIONS, "--log-dir", str(run_dir)]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "SIGTERM: stopping after the current step" in err
    assert f"stopped; resume with: python -m recipes.nested_unet --resume {run_dir}" in err
    assert load_checkpoint(run_dir / "last.pt")["position"]["batches"] == 2


def test_sighup_from_a_closed_terminal_stops_cleanly_and_the_run_resumes(tmp_path, monkeypatch, terminal):
    """The SSH session drops at step 2: the terminal hangs up, then SIGHUP arrives. The run has no
    terminal left to print on (the progress bar, the stop line), yet it saves step 2 and exits
    with 129; the resume then finishes the run."""
    run_dir = tmp_path / "run"
    terminal.attach()

    def hang_up():
        terminal.close()
        os.kill(os.getpid(), signal.SIGHUP)

    with monkeypatch.context() as patch:
        patch.setattr(ModelCheckpoint, "on_batch_end", at_step(2, hang_up))
        patch.setattr(ModelCheckpoint, "idle_hooks", lambda self, trainer: frozenset())
        assert run_cli(nested_unet.main, [*OPTIONS, "--log-dir", str(run_dir)]) == 128 + signal.SIGHUP
    position = load_checkpoint(run_dir / "last.pt")["position"]
    assert (position["epoch"], position["batches"]) == (0, 2)
    assert run_cli(nested_unet.main, ["--resume", str(run_dir)]) == 0
    assert load_checkpoint(run_dir / "last.pt")["epochs_done"] == 2
