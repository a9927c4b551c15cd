"""Nothing of a user's results is lost on the run folder: one writer per folder, a resume that never
starts over, predictions that never replace files unasked, and one line, with no partial file left,
when the disk fills or a folder cannot be written.

The races and the full disk are tested with the real command line in subprocesses (a tmpfs mounted
as root for the full disk; elsewhere a mocked ``ENOSPC`` checks the same line); what only needs a
run to refuse or to finish (the resumes that follow) runs the command line in this process."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import signal
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from recipes import nested_unet
from recipes.cli import parse_command_line, run_cli
from recipes.config import RunConfig
from recipes.errors import UsageError
from recipes.run_dir import hold_run_dir, start_run_dir
from tests.conftest import torch_save_on_a_full_disk
from tests.helpers import tiny_args
from tests.processes import RecipeProcess
from trainer.checkpoint import load_checkpoint
from trainer.runs.lock import RunLock
from trainer_datasets import write_png_file

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX locks and signals")

TIMEOUT = 300.0


def run(argv: list[str]) -> int:
    return run_cli(nested_unet.main, argv)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(err: str) -> str:
    """The one error line that ends `err` (after a progress bar, if training started), with no
    traceback before it."""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), err[-3000:]
    assert "Traceback" not in err and sum(line.startswith("error") for line in lines) == 1, err[-3000:]
    return lines[-1]


def earlier_run(folder: Path, files: tuple[str, ...] = ("config.json", "metrics.csv", "events", "best.pt")) -> Path:
    """A run folder as an earlier run left it (without last.pt): a valid config.json of `tiny_args`, and
    the other `files` with contents of their kind."""
    folder.mkdir(parents=True, exist_ok=True)
    recipe = nested_unet.NestedUNetRecipe()
    config = recipe.new_config(parse_command_line(recipe.build_parser(), tiny_args()))
    (folder / "config.json").write_text(json.dumps(config.saved()))
    if "metrics.csv" in files:
        (folder / "metrics.csv").write_text("epoch,step,loss,val_loss,val_iou\n0,2,0.9,0.8,0.578\n")
    if "events" in files:
        with SummaryWriter(str(folder)) as writer:
            writer.add_scalar("Validation/IoU", 0.578, 2)
    if "best.pt" in files:
        (folder / "best.pt").write_bytes(b"the earlier run's best state")
    return folder


@pytest.mark.parametrize("case", ["last.pt deleted", "last.pt is a folder", "config.json only"])
def test_resume_without_last_pt_changes_nothing_and_says_what_is_there(tmp_path, capsys, case):
    """A resume without a readable last.pt is refused with one line saying what the folder holds and
    that a new run is needed; nothing there changes (a resume never starts over)."""
    folder = earlier_run(
        tmp_path / "run",
        ("config.json",) if case == "config.json only" else ("config.json", "metrics.csv", "events", "best.pt"),
    )
    if case == "last.pt is a folder":
        (folder / "last.pt").mkdir()
        (folder / "last.pt" / "note.txt").write_text("kept")
    before = snapshot(folder)
    assert run(["--resume", str(folder)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert ("last.pt is a folder" if case == "last.pt is a folder" else "there is no last.pt") in line
    assert "config.json" in line and "start a new run" in line
    if case != "config.json only":
        assert "best.pt, config.json, " in line and "1 TensorBoard event file" in line
    assert snapshot(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.split("/")[0] for p in before)


def test_an_empty_log_dir_is_refused_instead_of_writing_into_the_current_folder(tmp_path, capsys, monkeypatch):
    """``--log-dir ''`` is refused by name; nothing is written in the current folder."""
    monkeypatch.chdir(tmp_path)
    assert run(tiny_args(log_dir="")) == 2
    assert "--log-dir ''" in one_error_line(capsys.readouterr().err)
    assert not list(tmp_path.iterdir())


def test_a_folder_holding_only_an_earlier_config_is_not_reused(tmp_path, capsys):
    """A folder holding an earlier run's config.json alone still holds a run: a new run there is refused."""
    folder = earlier_run(tmp_path / "run", ("config.json",))
    before = snapshot(folder)
    assert run(tiny_args(log_dir=folder)) == 2
    assert "already holds a run" in one_error_line(capsys.readouterr().err)
    assert snapshot(folder) == before


def test_resume_of_an_unwritable_run_folder_is_one_line(read_only_folder, capsys):
    """A resume of a run folder that cannot be written is one line, and changes nothing."""
    folder = read_only_folder(lambda f: earlier_run(f))
    before = snapshot(folder)
    assert run(["--resume", str(folder)]) == 2
    assert "not writable" in one_error_line(capsys.readouterr().err)
    assert snapshot(folder) == before


def test_config_json_that_cannot_be_written_leaves_no_file(tmp_path, mocker):
    """A config.json write that fails (ENOSPC at fsync) names the file and leaves nothing, not even the lock."""
    mocker.patch("trainer.atomic.os.fsync", side_effect=OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(UsageError, match=r"cannot write .*config\.json: No space left on device"):
        start_run_dir(str(tmp_path / "run"), "runs/x", RunConfig(epochs=1))
    assert not list((tmp_path / "run").iterdir())  # neither config.json, its temporary file nor the lock


def test_an_error_after_the_run_folder_was_moved_is_the_line_that_says_so(tmp_path):
    """A write that fails because the run folder was moved (a TensorBoard event written at its old
    path, say) ends the run with the line naming where the folder went and its last checkpoint, not
    with the write's error; an error while the folder is in place stays what it is. The lock is
    released either way, in the folder where it is."""
    folder, moved = tmp_path / "run", tmp_path / "moved"
    folder.mkdir()
    with pytest.raises(ValueError, match="unrelated"), contextlib.ExitStack() as stack:
        hold_run_dir(stack, RunLock(folder).acquire(), "recipes.nested_unet")
        raise ValueError("unrelated")
    assert not list(folder.iterdir())

    (folder / "last.pt").write_bytes(b"the last good checkpoint")
    with pytest.raises(UsageError) as stopped, contextlib.ExitStack() as stack:
        hold_run_dir(stack, RunLock(folder).acquire(), "recipes.nested_unet")
        folder.rename(moved)
        open(folder / "events.out.tfevents.1", "ab")  # what TensorBoard's writer does at the old path
    command = shlex.join(["python", "-m", "recipes.nested_unet", "--resume", str(moved)])
    assert str(stopped.value) == (
        f"the folder {folder} was moved to {moved} while the run trained; the run stopped without writing more; "
        f"the last good checkpoint is {moved / 'last.pt'} (resume with: {command})"
    )
    assert sorted(p.name for p in moved.iterdir()) == ["last.pt"]  # its lock released there


def test_a_full_disk_at_a_checkpoint_is_one_line_and_leaves_no_partial_file(tmp_path, capsys, mocker):
    """torch.save on a full disk: it writes part of the file, then raises RuntimeError with the
    OSError as context (``[enforce fail at inline_container.cc...]``). Here the second save, of
    last.pt after best.pt, fails so."""
    mocker.patch("trainer.checkpoint.torch.save", side_effect=torch_save_on_a_full_disk(saves_that_succeed=1))
    folder = tmp_path / "run"
    assert run(tiny_args(log_dir=folder)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot write {folder / 'last.pt'}: No space left on device" in line
    assert f"{folder / 'best.pt'} is whole" in line and "no last.pt to resume from" in line
    names = {p.name for p in folder.iterdir()}
    assert "last.pt" not in names and not [n for n in names if n.endswith(".tmp") or n == ".lock"]
    assert load_checkpoint(folder / "best.pt")["epochs_done"] == 1


# ------------------------------------------------------------------------------------------- predict
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of the recipe (a UNet, one class, 16x16) as predict reads it."""
    config = {
        "arch": "UNet",
        "deep_supervision": False,
        "classes": ["nucleus"],
        "image_size": 16,
        "precision": "32",
        "channels_last": False,
    }
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("checkpoint") / "best.pt"
    torch.save({"model": nested_unet.build_model("UNet", 1).state_dict(), "config": config}, path)
    return path


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    for index, name in enumerate(("a", "b")):
        write_png_file(torch.full((3, 16, 16), 40 * index, dtype=torch.uint8), folder / f"{name}.png")
    return folder


def predict(checkpoint: Path, images: Path, out: Path, *extra: str) -> int:
    return run(["predict", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out), *extra])


def test_predict_never_overwrites_unless_asked(checkpoint, images, tmp_path, capsys):
    """predict refuses to replace an existing output, naming it and --overwrite, and writes nothing;
    with --overwrite it replaces it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "b_mask.png").write_bytes(b"a mask drawn by hand")
    assert predict(checkpoint, images, out) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(out / "b_mask.png") in line and "--overwrite" in line
    assert snapshot(out) == {"b_mask.png": b"a mask drawn by hand"}  # nothing written, not even a_*.png

    assert predict(checkpoint, images, out, "--overwrite") == 0
    assert sorted(snapshot(out)) == ["a_mask.png", "a_prob.png", "b_mask.png", "b_prob.png"]
    assert (out / "b_mask.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("inside", ["masks/nucleus", "masks", ".", "predictions/new"])
def test_predict_refuses_an_out_folder_inside_a_training_data_folder(checkpoint, images, tmp_path, capsys, inside):
    """predict refuses an --out folder inside a training data folder, and writes nothing there."""
    data = tmp_path / "data"
    write_png_file(torch.zeros(3, 16, 16, dtype=torch.uint8), data / "images" / "a.png")
    write_png_file(torch.zeros(1, 16, 16, dtype=torch.uint8), data / "masks" / "nucleus" / "a.png")
    before = snapshot(data)
    assert predict(checkpoint, images, data / inside, "--overwrite") == 2
    assert "training data folder" in one_error_line(capsys.readouterr().err)
    assert snapshot(data) == before and not (data / "predictions").exists()


def test_predict_on_a_full_disk_is_one_line_and_leaves_only_whole_files(checkpoint, images, tmp_path, capsys, mocker):
    """A full disk during predict is one line naming the file and what was written whole; the partial
    file is removed, and the folder's mark says the outputs are incomplete."""
    from recipes import prediction

    real_write, calls = prediction.write_png_file, []

    def fills_the_disk(image, path):  # the third file (b's probability map) finds the disk full
        calls.append(path)
        if len(calls) < 3:
            return real_write(image, path)
        Path(path).write_bytes(b"\x89PNG part")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    mocker.patch("recipes.prediction.write_png_file", side_effect=fills_the_disk)
    out = tmp_path / "out"
    assert predict(checkpoint, images, out) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot write {out / 'b_prob.png'}: No space left on device" in line
    assert "the outputs of the 1 image before it" in line
    assert sorted(p.name for p in out.iterdir()) == ["PREDICT_INCOMPLETE.txt", "a_mask.png", "a_prob.png"]


def test_predict_into_an_unwritable_folder_is_one_line(checkpoint, images, read_only_folder, capsys):
    """predict into a folder that cannot be written is one line."""
    assert predict(checkpoint, images, read_only_folder()) == 2
    assert "not writable" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", ["new run", "resume", "predict"])
def test_a_lock_link_planted_in_a_folder_is_refused_and_its_target_kept(checkpoint, images, tmp_path, capsys, command):
    """A ``.lock`` symbolic link planted in a run or output folder (to another user's file, say) stops a
    new run, a resume and predict with one line naming it; the file it points to and the folder stay as
    they were."""
    folder = earlier_run(tmp_path / "run") if command == "resume" else tmp_path / "run"
    folder.mkdir(exist_ok=True)
    target = tmp_path / "elsewhere" / ".bashrc"
    target.parent.mkdir()
    target.write_text("export PATH=$HOME/bin:$PATH\n")
    (folder / ".lock").symlink_to(target)
    before = snapshot(folder)
    if command == "predict":
        assert predict(checkpoint, images, folder) == 2
    else:
        assert run(["--resume", str(folder)] if command == "resume" else tiny_args(log_dir=folder)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot be locked: {folder / '.lock'} is a symbolic link (to {target}), not a lock file" in line
    assert target.read_text() == "export PATH=$HOME/bin:$PATH\n" and snapshot(folder) == before


# ------------------------------------------------------------------- several processes, a full disk
# The recipe's command line, held right after the checkpoints of its first epoch until it is killed.
HOLD_AFTER_FIRST_EPOCH = textwrap.dedent(f"""
    import runpy, sys, threading
    from trainer.callbacks import ModelCheckpoint
    save = ModelCheckpoint.on_epoch_end
    def save_and_hold(self, trainer, logs):
        save(self, trainer, logs)
        print("held", file=sys.stderr, flush=True)
        threading.Event().wait({TIMEOUT})
    ModelCheckpoint.on_epoch_end = save_and_hold
    runpy.run_module("recipes.nested_unet", run_name="__main__", alter_sys=True)
""")


@dataclass
class Race:
    """Two runs started at once on one `folder`: the `loser` has ended, the `winner` is held after
    its first epoch; `files` is the folder as it was then."""

    folder: Path
    winner: RecipeProcess
    loser: RecipeProcess
    files: dict[str, bytes]


@pytest.fixture(scope="module")
def race(tmp_path_factory):
    """Two runs of two epochs started at once on one folder, both held after their first epoch's
    checkpoints: whichever is refused has ended; the other stays alive (until a test kills it) so
    the refusal always meets a live run, however late the second process starts."""
    folder = tmp_path_factory.mktemp("race") / "run"
    runs = [
        RecipeProcess(tiny_args(epochs=2, log_dir=folder), code=HOLD_AFTER_FIRST_EPOCH, timeout=TIMEOUT)
        for _ in range(2)
    ]

    def held(run: RecipeProcess) -> bool:
        return "held" in run.stderr

    def ended(run: RecipeProcess) -> bool:
        return run.process.poll() is not None

    # One has ended (or, were the folder not guarded, both are held).
    assert runs[0].poll_until(lambda: any(map(ended, runs)) or all(map(held, runs))), [r.stderr[-2000:] for r in runs]
    loser, winner = runs if ended(runs[0]) else runs[::-1]
    if ended(loser):
        loser.finish()  # the rest of its output
    assert winner.poll_until(lambda: held(winner)), winner.stderr[-3000:]
    yield Race(folder, winner, loser, snapshot(folder))
    for r in runs:
        r.stop()


def test_two_runs_started_at_once_on_one_folder_one_trains_the_other_writes_nothing(race):
    """Of two runs started at once on one folder one trains; the other stops with one line naming
    the live run (pid and host) and writes nothing there: one event file, one row per epoch."""
    assert race.loser.process.returncode == 2, race.loser.stderr[-3000:]
    line = one_error_line(race.loser.stderr)
    # Refused at its first look (the other run had written config.json) or at the lock: named either way.
    assert f"in use by another run (pid {race.winner.process.pid} on " in line
    assert "run written to" not in race.loser.stdout
    events = [name for name in race.files if name.startswith("events.out.tfevents.")]
    assert len(events) == 1 and f".{race.winner.process.pid}." in events[0]
    assert sorted(name for name in race.files if name not in events) == [
        ".lock",
        "best.pt",
        "config.json",
        "last.pt",
        "metrics.csv",
    ]
    assert len(race.files["metrics.csv"].decode().splitlines()) == 2  # the header and one epoch


def test_a_resume_is_refused_while_the_run_lives_even_with_its_lock_file_removed(race, capsys):
    """The lock holds the run folder, not the file: with the live run's ``.lock`` removed, a resume is
    still refused in one line naming the run (its pid, from the kernel's lock table on Linux), and
    writes nothing there, not even a lock file of its own."""
    folder, aside = race.folder, race.folder.parent / "lock-aside"
    (folder / ".lock").rename(aside)
    try:
        before = snapshot(folder)
        assert run(["--resume", str(folder)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "in use by another run (" in line
        if os.path.exists("/proc/locks"):
            assert f"in use by another run (pid {race.winner.process.pid} on " in line
        assert snapshot(folder) == before
    finally:
        aside.rename(folder / ".lock")  # the same file: the live run's check still finds its own


def test_resume_of_a_live_run_is_refused_and_a_killed_runs_lock_is_taken_over(race, capsys):
    """A resume of a folder whose run is alive stops with one line naming it and changes nothing;
    once that run is killed (SIGKILL: its lock file stays, the kernel drops the lock), a resume takes
    the lock over, removes what killed writes left, and finishes the run."""
    folder, live = race.folder, race.winner
    before = snapshot(folder)
    assert run(["--resume", str(folder)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"in use by another run (pid {live.process.pid} on " in line
    assert snapshot(folder) == before

    assert live.stop(signal.SIGKILL) == -signal.SIGKILL
    assert json.loads((folder / ".lock").read_text())["pid"] == live.process.pid  # stale: its holder is dead
    for leftover in (".last.pt.99999.tmp", ".config.json.tmp"):  # what killed writes leave
        (folder / leftover).write_bytes(b"partial")
    assert run(["--resume", str(folder)]) == 0, capsys.readouterr().err[-3000:]
    assert load_checkpoint(folder / "last.pt")["epochs_done"] == 2
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no leftovers, lock released


def test_a_full_disk_stops_with_one_line_and_the_run_resumes_once_there_is_room(small_disk, capsys):
    """A real recipe process on a tmpfs that holds the first epoch's two checkpoints (about 1.6 MB
    each) but not a third: the second epoch's first checkpoint write fills it, and the run stops with
    one line naming the last good checkpoint, leaving no partial or hidden file. Once the disk has
    room, the printed resume finishes the run."""
    folder = small_disk.mount("4m") / "run"
    full = RecipeProcess(tiny_args(epochs=2, log_dir=folder), timeout=TIMEOUT)
    assert full.finish() == 2, full.stderr[-3000:]
    line = one_error_line(full.stderr)
    assert "Exception in thread" not in full.stderr
    assert line.startswith(f"error: cannot write {folder}") and "No space left on device" in line, line
    command = shlex.join(["python", "-m", "recipes.nested_unet", "--resume", str(folder)])
    assert f"the last good checkpoint is {folder / 'last.pt'} (resume with: {command})" in line
    files = [p for p in folder.iterdir()]
    assert not [p.name for p in files if p.name.startswith(".") or p.stat().st_size == 0]
    assert load_checkpoint(folder / "last.pt")["epochs_done"] == 1
    assert load_checkpoint(folder / "best.pt")["epochs_done"] == 1
    assert json.loads((folder / "config.json").read_text())["epochs"] == 2

    small_disk.remount("8m")
    assert run(["--resume", str(folder)]) == 0, capsys.readouterr().err[-3000:]
    assert load_checkpoint(folder / "last.pt")["epochs_done"] == 2
    assert len((folder / "metrics.csv").read_text().splitlines()) == 3


# The recipe's command line, held after the checkpoints of its first epoch until the file named by its
# first argument exists.
HOLD_UNTIL_TOLD = textwrap.dedent(f"""
    import os, runpy, sys, time
    from trainer.callbacks import ModelCheckpoint
    save, go = ModelCheckpoint.on_epoch_end, sys.argv.pop(1)
    def save_and_hold(self, trainer, logs):
        save(self, trainer, logs)
        if trainer.epoch == 0:
            print("held", file=sys.stderr, flush=True)
            deadline = time.monotonic() + {TIMEOUT}
            while not os.path.exists(go) and time.monotonic() < deadline:
                time.sleep(0.01)
    ModelCheckpoint.on_epoch_end = save_and_hold
    runpy.run_module("recipes.nested_unet", run_name="__main__", alter_sys=True)
""")


def test_a_run_whose_folder_is_moved_stops_at_its_next_epoch_end_and_writes_nothing_at_the_old_path(tmp_path, capsys):
    """A live run whose folder is renamed, with a new run's folder made at the old name, stops at its
    next epoch end with one line naming the folder, where it went and the last good checkpoint there,
    exit code 2. It writes nothing into the new folder nor removes its lock; it releases its own lock
    where its folder went, and the printed resume finishes it."""
    folder, moved, go = tmp_path / "run", tmp_path / "moved", tmp_path / "go"
    live = RecipeProcess([str(go), *tiny_args(epochs=3, log_dir=folder)], code=HOLD_UNTIL_TOLD, timeout=TIMEOUT)
    try:
        assert live.poll_until(lambda: "held" in live.stderr), live.stderr[-3000:]
        folder.rename(moved)
        folder.mkdir()
        with RunLock(folder) as newer:  # a new run started at the old name
            (folder / "config.json").write_text("the new run's configuration")
            before = snapshot(folder)
            go.touch()
            assert live.finish() == 2, live.stderr[-3000:]
            assert snapshot(folder) == before and newer.held
    finally:
        live.stop()
    line = one_error_line(live.stderr)
    command = shlex.join(["python", "-m", "recipes.nested_unet", "--resume", str(moved)])
    assert line == (
        f"error: the folder {folder} was moved to {moved} while the run trained; the run stopped without writing "
        f"more; the last good checkpoint is {moved / 'last.pt'} (resume with: {command})"
    )
    assert not (moved / ".lock").exists()
    assert len((moved / "metrics.csv").read_text().splitlines()) == 2  # the header and the first epoch
    assert load_checkpoint(moved / "last.pt")["epochs_done"] == 1

    assert run(["--resume", str(moved)]) == 0, capsys.readouterr().err[-3000:]
    assert load_checkpoint(moved / "last.pt")["epochs_done"] == 3
    assert len((moved / "metrics.csv").read_text().splitlines()) == 4
