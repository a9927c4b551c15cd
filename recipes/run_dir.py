"""Run folders: a new run's directory, its lock and first config.json; the lock held for the run and its
folder watched while it trains; the checks that let a run resume; the one line of a write that failed."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from recipes.cli import CommandLine, resume_command
from recipes.config import RunConfig
from recipes.errors import RunComplete, UsageError
from recipes.run_checks import check_recipe_config
from trainer.atomic import atomic_write_text, remove_temporary_files
from trainer.callback import Callback
from trainer.callbacks.checkpoint import CHECKPOINT_BEST, CHECKPOINT_LAST
from trainer.callbacks.tensorboard import has_event_files
from trainer.checkpoint import load_checkpoint
from trainer.distributed import broadcast_object, is_rank_zero
from trainer.every import Every
from trainer.runs.lock import LockFileError, RunLock, RunLockedError, RunLockLostError
from trainer.runs.lock_file import LOCK_FILE

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "WRITE_ERRNOS",
    "RunFolderGuard",
    "hold_run_dir",
    "lock_run_dir",
    "resume_run",
    "start_run_dir",
    "write_error_line",
    "write_run_config",
]


CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"


def holds_run(path: Path) -> bool:
    """Whether `path` already holds a run (TensorBoard event files, checkpoints, a run's
    ``config.json`` or ``metrics.csv``)."""
    return (
        any((path / name).exists() for name in (CONFIG_FILE, METRICS_FILE))
        or has_event_files(path, recursive=True)
        or bool(glob.glob(str(path / "**" / "*.pt"), recursive=True))
    )


def check_new_run_dir(log_dir: str, default_root: str) -> Path:
    """`log_dir` as the directory of a new run, checked without creating anything: an empty
    name, a file, or a directory that already holds a run (see `holds_run`) is a `UsageError`."""
    if not log_dir.strip():
        raise UsageError(
            "--log-dir '' names no directory; give a new directory, or leave --log-dir out for "
            f"a new {default_root}/<timestamp>"
        )
    path = Path(log_dir)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--log-dir {str(path)!r} is a file, not a directory")
    if path.is_dir() and holds_run(path):
        holder = RunLock(path).live_holder()
        live = f", which is in use by another run ({describe_holder(holder)})" if holder is not None else ""
        raise UsageError(f"--log-dir {str(path)!r} already holds a run{live}; choose a new directory")
    return path


def make_run_dir(log_dir: str | None, default_root: str) -> Path:
    """The directory of a new run, created empty and writable.

    Without `log_dir`, a fresh ``<default_root>/<timestamp>`` that no earlier run used (created
    here, so two runs started in the same second get two directories). An explicit `log_dir`
    that already holds a run (see `holds_run`) is refused, so no run is ever overwritten; an
    empty `log_dir` too.
    """
    if log_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path, suffix = Path(default_root) / stamp, 1
        while True:
            try:
                path.mkdir(parents=True)
                break
            except FileExistsError:
                path, suffix = Path(default_root) / f"{stamp}-{suffix}", suffix + 1
            except OSError as exc:
                raise UsageError(f"cannot create the log directory {str(path)!r}: {exc.strerror or exc}") from None
    else:
        path = check_new_run_dir(log_dir, default_root)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the log directory {str(path)!r}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"the log directory {str(path)!r} is not writable")
    return path


def describe_holder(holder: dict[str, Any]) -> str:
    """``pid P on HOST since TIME`` from a `RunLock` record (without ``since`` when the holder's
    lock file was removed and only the kernel named it)."""
    if not holder:
        return "a process that is starting"
    since = f" since {holder['started']}" if "started" in holder else ""
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}{since}"


def lock_run_dir(path: Path, what: str) -> RunLock:
    """Take `path`'s `RunLock` (one writer per folder); another live run holding it, a lock
    file that is not a plain file of its own (a planted link) or another user's stale lock file
    that cannot be removed, or a folder where the lock file cannot be written, is a `UsageError`
    naming `what` (the option and value that named the folder).

    Args:
        path: the folder.
        what: the option and value that named it, for the messages (``--out 'preds'``).
    """
    try:
        return RunLock(path).acquire()
    except RunLockedError as exc:
        raise UsageError(
            f"{what} is in use by another run ({describe_holder(exc.holder)}); wait for it to end or "
            "choose another directory"
        ) from None
    except LockFileError as exc:
        raise UsageError(f"{what} cannot be locked: {exc}") from None
    except OSError as exc:
        raise UsageError(
            f"{what} is not writable: cannot create {exc.filename or path / LOCK_FILE}: {exc.strerror or exc}"
        ) from None


def lost_folder_line(exc: RunLockLostError, recipe_module: str) -> str:
    """One line for a run that stopped because its folder was moved or removed, or its lock file
    removed or replaced (`RunLock.check`): what happened, and where the last good checkpoint is
    now with the command that resumes it.

    Args:
        exc: what `RunLock.check` found.
        recipe_module: the recipe's module, for the resume command.
    """
    line = f"{exc} while the run trained; the run stopped without writing more"
    if exc.removed:
        return line + "; its checkpoints were removed with it: start a new run"
    folder = exc.folder if exc.lock_file else exc.moved_to
    if folder is None:
        return (
            line + f"; its last good checkpoint is {CHECKPOINT_LAST} in the folder where it went: "
            "resume with --resume NEW_PATH"
        )
    last = folder / CHECKPOINT_LAST
    if last.is_file():
        return line + f"; the last good checkpoint is {last} (resume with: {resume_command(recipe_module, folder)})"
    return line + f"; no checkpoint was written yet in {folder}: start a new run"


class RunFolderGuard(Callback):
    """Stops a run, before it writes more, once its folder was moved or removed or its lock file
    removed or replaced (`RunLock.check`): a `UsageError` whose line (`lost_folder_line`) says
    what happened and where the last good checkpoint is. It looks before any callback writes at
    the end of each validation and each epoch, and at each step checkpoint: a few ``stat`` calls,
    nothing per batch without step checkpoints. It runs on rank 0, which holds the lock.

    Args:
        lock: the run folder's lock (None: nothing to watch, on other ranks or without a folder).
        recipe_module: the recipe's module, for the resume command.
        checkpoint_every: the period of the step checkpoints in optimizer steps (None: none).
    """

    order = -1000  # before every callback that writes
    rank_zero_only = True

    def __init__(self, lock: RunLock | None, recipe_module: str, checkpoint_every: int | None = None) -> None:
        self.lock, self.recipe_module = lock, recipe_module
        self._step_point = Every(checkpoint_every, "checkpoint_every")

    def idle_hooks(self, trainer: Any) -> frozenset[str]:
        """Nothing to watch without a lock; no step hook without step checkpoints."""
        if self.lock is None:
            return frozenset({"on_batch_end", "on_validation_end", "on_epoch_end"})
        return frozenset({"on_batch_end"}) if self._step_point.n is None else frozenset()

    def on_batch_end(self, trainer: Any, batch: Any, outputs: Any) -> None:
        if self._step_point(trainer.global_step):
            self.check()

    def on_validation_end(self, trainer: Any, logs: dict[str, float]) -> None:
        self.check()

    def on_epoch_end(self, trainer: Any, logs: dict[str, float]) -> None:
        self.check()

    def check(self) -> None:
        """Raise the `UsageError` of `lost_folder_line` if the folder or its lock file is no longer the run's."""
        if self.lock is None:
            return
        try:
            self.lock.check()
        except RunLockLostError as exc:
            raise UsageError(lost_folder_line(exc, self.recipe_module)) from None


def hold_run_dir(stack: contextlib.ExitStack, lock: RunLock | None, recipe_module: str) -> None:
    """Hold `lock`, a run folder's (None on ranks other than 0: nothing), until `stack` closes,
    then release it. An error that ends the run after its folder was moved or removed, or its
    lock file removed or replaced (a write at the folder's old path fails, say), becomes the one
    line of `lost_folder_line` instead.

    Args:
        stack: the stack that holds what the run needs until it ends.
        lock: the lock, held.
        recipe_module: the recipe's module, for the resume command.
    """
    if lock is not None:
        stack.enter_context(_holding(lock, recipe_module))


@contextlib.contextmanager
def _holding(lock: RunLock, recipe_module: str) -> Iterator[None]:
    try:
        yield
    except UsageError:
        raise
    except Exception:
        try:
            lock.check()
        except RunLockLostError as exc:
            raise UsageError(lost_folder_line(exc, recipe_module)) from None
        raise
    finally:
        lock.release()


def write_error_line(exc: OSError, run_dir: Path | None, command: str | None = None) -> str:
    """One line for a write that failed (a full disk, a read-only folder) during a run: the path
    (the run directory when the error names none, as the TensorBoard writer's does), the reason
    and what is still valid: the last good checkpoint and the command that resumes it (once
    there is room), else ``best.pt`` if there is one, or that no checkpoint was written.

    Args:
        exc: the error of the write.
        run_dir: the run directory (None: a ``--fast-dev-run``'s, not kept).
        command: the command that resumes the run.
    """
    where = exc.filename or (f"into {run_dir}" if run_dir is not None else "a file")
    line = f"cannot write {where}: {exc.strerror or exc}; the run stopped"
    last, best = (run_dir / CHECKPOINT_LAST, run_dir / CHECKPOINT_BEST) if run_dir is not None else (None, None)
    if last is not None and last.is_file():
        return line + f"; the last good checkpoint is {last}" + (f" (resume with: {command})" if command else "")
    if best is not None and best.is_file():
        return line + f"; {best} is whole (for predict), but there is no {CHECKPOINT_LAST} to resume from"
    return line + "; no checkpoint was written"


#: Errors numbers of a write that a full disk, a quota or the folder's permissions refused.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


def start_run_dir(log_dir: str | None, default_root: str, config: RunConfig) -> tuple[Path, RunLock | None]:
    """Create a new run's directory (see `make_run_dir`), take its `RunLock` and record the
    configuration there first (atomically) in ``config.json``, so a run killed before its first
    checkpoint still says what it was (`write_run_config`; once the trainer has chosen the
    precision, `recipes.common.RunStart` writes it again with the choice and why it, the threads
    and the OpenMP waiting were chosen). Returns the directory and the lock, which the caller holds until the run ends
    (`hold_run_dir`; None on ranks other than 0).

    A directory another live run holds, or one that came to hold a run between the first look
    and the lock (two runs started at once), is a `UsageError`, and nothing is written there.
    Under torchrun, rank 0 creates and locks it, and every rank gets the same path (or the same
    error).

    Args:
        log_dir: ``--log-dir`` (None: a new ``<default_root>/<timestamp>``).
        default_root: the folder of new runs (``runs/<recipe>``).
        config: the run's configuration.
    """
    result: tuple[Path, RunLock | None] | UsageError | None = None
    if is_rank_zero():
        lock = None
        try:
            path = make_run_dir(log_dir, default_root)
            lock = lock_run_dir(path, f"--log-dir {str(path)!r}")
            if holds_run(path):  # another run wrote it between make_run_dir's look and the lock
                raise UsageError(f"--log-dir {str(path)!r} already holds a run; choose a new directory")
            try:
                write_run_config(path, config)
            except OSError as exc:
                raise UsageError(write_error_line(exc, None)) from None
            result = (path, lock)
        except UsageError as exc:
            if lock is not None:
                lock.release()
            result = exc
    shared = broadcast_object(result if not isinstance(result, tuple) else result[0])
    if isinstance(shared, UsageError):
        raise shared
    return shared, (result[1] if isinstance(result, tuple) else None)  # the lock: rank 0 only


def write_run_config(path: Path, config: RunConfig, record: Mapping[str, Any] | None = None) -> None:
    """Write the run folder `path`'s ``config.json`` atomically: `config`'s saved fields, with the
    entries of `record` beside them (what this command found, such as why its precision, threads
    and OpenMP waiting were chosen, see `recipes.common.start_details`: not part of the
    configuration, so not in the checkpoints).

    Args:
        path: the run folder.
        config: the run's configuration.
        record: what this command found, saved beside the configuration.
    """
    saved = {**(record or {}), **config.saved()}
    atomic_write_text(json.dumps(saved, indent=2, sort_keys=True), path / CONFIG_FILE)


def describe_folder(path: Path) -> str:
    """What a run directory holds, for an error message: its visible entries (up to eight),
    event files counted together."""
    names, events = [], 0
    for entry in sorted(path.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.name.startswith("events.out.tfevents."):
            events += 1
        else:
            names.append(entry.name + ("/" if entry.is_dir() else ""))
    if events:
        names.append(f"{events} TensorBoard event file{'s' if events > 1 else ''}")
    if not names:
        return "nothing"
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def resume_run(
    command: CommandLine, config_class: type[RunConfig] = RunConfig, recipe: str = ""
) -> tuple[Path, RunConfig, Path, RunLock | None]:
    """The run directory to resume (``--resume``), its configuration, its last checkpoint and the
    directory's `RunLock`, which the caller holds until the run ends (`hold_run_dir`; None on ranks
    other than 0, which do not lock).

    The lock is taken first: a run that is still training there, or a directory where the lock
    cannot be written, is a `UsageError`. A run resumes only from a readable ``last.pt``; without
    one (removed, a folder in its place, or only ``config.json`` because the run was stopped
    before its first checkpoint) it is a `UsageError` saying what the directory holds, and
    nothing there is touched: a resumed run never starts over. Once every check passed, the
    temporary files that killed writes left there are removed.

    The run keeps its saved options. Those in `RunConfig.RESUMABLE` (``--epochs``, ``--device``...)
    may change; any other option given on the command line with a value other than the saved one
    is a `UsageError` naming it, and so is a saved configuration without the fields every run of
    `config_class` holds (a run of another recipe than `recipe`). A run with nothing left to
    train (it finished its epochs, stopped early, or ``--epochs`` is not above the epochs it
    trained) raises `RunComplete`.

    Args:
        command: the parsed command line, with ``--resume RUN_DIR``.
        config_class: the recipe's configuration class.
        recipe: the recipe's name, for the messages.
    """
    resume = command.args.resume
    if not resume.strip():
        raise UsageError("--resume '' names no run directory")
    path = Path(resume)
    if not path.is_dir():
        raise UsageError(f"--resume {resume!r}: no such run directory")
    lock = lock_run_dir(path, f"--resume {resume!r}") if is_rank_zero() else None
    try:
        if not os.access(path, os.W_OK):
            raise UsageError(f"--resume {resume!r}: the run directory is not writable")
        config = _resumable_config(command, path, config_class, recipe)
        if lock is not None:
            remove_temporary_files(path)
        return path, config, path / CHECKPOINT_LAST, lock
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _resumable_config(command: CommandLine, path: Path, config_class: type[RunConfig], recipe: str) -> RunConfig:
    """The configuration `resume_run` continues `path`'s run with (see there)."""
    args, given, last = command.args, command.given, path / CHECKPOINT_LAST
    if not last.is_file():
        found = f"{CHECKPOINT_LAST} is a folder" if last.is_dir() else f"there is no {CHECKPOINT_LAST}"
        raise UsageError(
            f"--resume {args.resume!r}: {found}, so there is no checkpoint to continue from (the directory holds "
            f"{describe_folder(path)}); a run stopped before its first checkpoint cannot be resumed: start a new "
            "run with another --log-dir (nothing here was changed)"
        )
    try:
        state = load_checkpoint(last, resume=True)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{str(exc)}; nothing was changed") from None
    saved = state.get("config") if isinstance(state, dict) else None
    if not saved:
        raise UsageError(f"--resume {args.resume!r}: its checkpoint holds no recipe configuration")
    check_recipe_config(saved, config_class.required_fields(), last, recipe)
    if "log_dir" in given:
        raise UsageError(f"{given['log_dir']} cannot move a resumed run: it continues in {path}")
    resumable = config_class.RESUMABLE
    for dest, option in given.items():
        # Options outside the saved configuration (e.g. --download) do not define the run.
        value = config_class.option_value(dest, getattr(args, dest))
        if dest not in resumable and dest in saved and value != saved[dest]:
            raise UsageError(
                f"{option} {value} differs from the run's saved {saved.get(dest)!r}; a resumed run keeps "
                f"its options (only {', '.join('--' + d.replace('_', '-') for d in resumable)} may change): start a "
                f"new run to change {option}"
            )
    config = config_class.from_saved(saved, args)
    config.update(**{dest: getattr(args, dest) for dest in given.keys() & set(resumable)})
    done = len(state.get("history", []))
    if state.get("should_stop") and state.get("position") is None:
        raise RunComplete(f"run {path} is complete: it stopped early after {done} epochs; nothing to resume")
    if done >= config.epochs:
        more = "" if "epochs" in given else f"; pass --epochs above {done} to train it further"
        raise RunComplete(f"run {path} is complete: it trained {done} of {config.epochs} epochs{more}")
    return config
