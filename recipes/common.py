"""What the recipes share: run directories, option types and one-line command-line errors."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import glob
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch

from recipes import WAIT_POLICY
from trainer import Callback, NonFiniteLossError, TimeLimitReached, Trainer, TrainingInterrupted, resolve_device
from trainer.callbacks import CSVLogger, HistogramCallback, ModelCheckpoint
from trainer.callbacks.tensorboard import has_event_files
from trainer.checkpoint import atomic_write_text, load_checkpoint, remove_temporary_files
from trainer.distributed import broadcast_object, init_distributed, is_rank_zero
from trainer.limits import parse_duration
from trainer.precision import PrecisionChoice, choose_precision
from trainer.run_lock import LOCK_FILE, RunLock, RunLockedError
from trainer.threads import ThreadChoice, use_threads
from trainer.workers import STOP_SIGNALS
from recipes.errors import UsageError
from recipes.run_checks import check_metrics_csv, check_optimizer, check_recipe_config, check_weights


class RecipeArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        """As `argparse.ArgumentParser.parse_args`, with a hint for each unknown option that is
        close to a known one: ``--checkpoint_every`` gets "did you mean --checkpoint-every?"."""
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            message = f"unrecognized arguments: {' '.join(extras)}"
            hints = [hint for hint in map(self._hint, extras) if hint]
            self.error(message + (f"; did you mean {', '.join(hints)}?" if hints else ""))
        return namespace

    def _hint(self, arg: str) -> str | None:
        """The known option `arg` (an unknown ``--option[=value]``) most likely stands for."""
        if not arg.startswith("--"):
            return None
        name = arg.split("=", 1)[0]
        known = [option for action in self._actions for option in action.option_strings if option.startswith("--")]
        spelled = "--" + name[2:].replace("_", "-").lower()
        if spelled in known:
            return spelled
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        return close[0] if close else None


class Interrupted(TrainingInterrupted):
    """Training was stopped by a signal after finishing its current step."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def _bounded(convert: Callable[[str], float], minimum: float, inclusive: bool, wanted: str,
             below: float = math.inf, maximum: float = math.inf) -> Callable[[str], Any]:
    """An argparse type: `convert`, then a finite value above (or, if `inclusive`, at) `minimum`,
    strictly below `below` and at most `maximum`."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if (not math.isfinite(value) or value < minimum or (value == minimum and not inclusive)
                or value >= below or value > maximum):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    parse.__name__ = wanted
    return parse


#: The largest float32: model weights and optimizer values are float32, so no option may be larger.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
#: Seeds torch's generators take, and that stay in range with an epoch or offset added.
MAX_SEED = 2**63 - 1

positive_int = _bounded(int, 0, False, "a positive integer")
non_negative_int = _bounded(int, 0, True, "an integer >= 0")
positive_float = _bounded(float, 0.0, False, f"a positive number up to {FLOAT32_MAX:.4g} (the float32 limit)",
                          maximum=FLOAT32_MAX)
non_negative_float = _bounded(float, 0.0, True, f"a number from 0 to {FLOAT32_MAX:.4g} (the float32 limit)",
                              maximum=FLOAT32_MAX)
fraction = _bounded(float, 0.0, False, "a number between 0 and 1", below=1.0)
seed_int = _bounded(int, 0, True, f"an integer from 0 to {MAX_SEED}", maximum=MAX_SEED)


def duration(text: str) -> float:
    """argparse type of ``--max-time``: ``HH:MM:SS`` (or ``D:HH:MM:SS``) in seconds, above zero."""
    try:
        return parse_duration(text, "--max-time")
    except ValueError:
        parts = text.strip().split(":")
        if len(parts) in (3, 4) and all(part.isdigit() and int(part) == 0 for part in parts):
            raise argparse.ArgumentTypeError(f"must be above zero, got {text!r} (e.g. 00:30:00 for half an "
                                             "hour)") from None
        raise argparse.ArgumentTypeError(f"expected HH:MM:SS (or D:HH:MM:SS), got {text!r}") from None


duration.__name__ = "HH:MM:SS"


def device_option(text: str) -> str:
    """argparse type of ``--device``: ``auto``, ``cpu``, or ``cuda``/``cuda:N`` with that GPU
    present; anything else (``mps``, ``meta``, ``cuda:7`` on a 1-GPU machine) is refused at once."""
    wanted = "auto, cpu, cuda or cuda:N"
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r} (the recipes train on the CPU or CUDA "
                                         "only)")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r} was asked for but no CUDA GPU is available; use cpu or auto")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r} was asked for but this machine has {count} CUDA GPU(s): "
                                             f"cuda:0 to cuda:{count - 1}")
    return text


device_option.__name__ = "device"


def holds_run(path: Path) -> bool:
    """Whether `path` already holds a run (TensorBoard event files, checkpoints, a run's
    ``config.json`` or ``metrics.csv``)."""
    return (any((path / name).exists() for name in (CONFIG_FILE, METRICS_FILE))
            or has_event_files(path, recursive=True) or bool(glob.glob(str(path / "**" / "*.pt"), recursive=True)))


def check_new_run_dir(log_dir: str, default_root: str) -> Path:
    """`log_dir` as the directory of a new run, checked without creating anything: an empty
    name, a file, or a directory that already holds a run (see `holds_run`) is a `UsageError`."""
    if not log_dir.strip():
        raise UsageError("--log-dir '' names no directory; give a new directory, or leave --log-dir out for "
                         f"a new {default_root}/<timestamp>")
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
    """``pid P on HOST since TIME`` from a `RunLock` record."""
    if not holder:
        return "a process that is starting"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')}"


def lock_run_dir(path: Path, what: str) -> RunLock:
    """Take `path`'s `RunLock` (one writer per folder); another live run holding it, or a
    folder where the lock file cannot be written, is a `UsageError` naming `what` (the option
    and value that named the folder)."""
    try:
        return RunLock(path).acquire()
    except RunLockedError as exc:
        raise UsageError(f"{what} is in use by another run ({describe_holder(exc.holder)}); wait for it to end or "
                         "choose another directory") from None
    except OSError as exc:
        raise UsageError(f"{what} is not writable: cannot create {exc.filename or path / LOCK_FILE}: "
                         f"{exc.strerror or exc}") from None


def write_error_line(exc: OSError, run_dir: Path | None, command: str | None = None) -> str:
    """One line for a write that failed (a full disk, a read-only folder) during a run: the path
    (the run directory when the error names none, as the TensorBoard writer's does), the reason
    and what is still valid: the last good checkpoint and the command that resumes it (once
    there is room), else ``best.pt`` if there is one, or that no checkpoint was written."""
    where = exc.filename or (f"into {run_dir}" if run_dir is not None else "a file")
    line = f"cannot write {where}: {exc.strerror or exc}; the run stopped"
    last, best = (run_dir / "last.pt", run_dir / "best.pt") if run_dir is not None else (None, None)
    if last is not None and last.is_file():
        return line + f"; the last good checkpoint is {last}" + (f" (resume with: {command})" if command else "")
    if best is not None and best.is_file():
        return line + f"; {best} is whole (for predict), but there is no last.pt to resume from"
    return line + "; no checkpoint was written"


#: Errors numbers of a write that a full disk, a quota or the folder's permissions refused.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a recipe's `main` and return its exit code: 0 for a run complete already (one line),
    2 for bad input (`UsageError` or a bad option: one line on stderr), 1 for a non-finite loss,
    130 for Ctrl-C, and the code of any `SystemExit` (``--help``: 0; a signal: 128 + its number).
    Use it as ``sys.exit(run_cli(main))``."""
    try:
        return main(argv)
    except RunComplete as exc:
        print(exc)
        return 0
    except UsageError as exc:
        # A data error may list several problems on separate lines; the command line shows one line.
        print("error: " + " ".join(line.strip() for line in str(exc).splitlines() if line.strip()), file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print("error: " + "; ".join([str(exc), *getattr(exc, "__notes__", [])]), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)  # what sys.exit("message") prints
        return 1


CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"


def start_run_dir(log_dir: str | None, default_root: str, config: dict[str, Any]) -> tuple[Path, RunLock | None]:
    """Create a new run's directory (see `make_run_dir`), take its `RunLock` and record the
    configuration there first (atomically), so a run killed before its first checkpoint still
    says what it was. Returns the directory and the lock, which the caller releases when the run
    ends (None on ranks other than 0).

    A directory another live run holds, or one that came to hold a run between the first look
    and the lock (two runs started at once), is a `UsageError`, and nothing is written there.
    Under torchrun, rank 0 creates and locks it, and every rank gets the same path (or the same
    error).
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
                atomic_write_text(json.dumps(config, indent=2, sort_keys=True), path / CONFIG_FILE)
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
    return shared, (result[1] if is_rank_zero() else None)


class RunComplete(Exception):
    """A resumed run has nothing left to train: reported as one line, exit code 0."""


#: Options a resumed run may take anew: how far to train, where and how often to save, not what the run is.
RESUMABLE_OPTIONS = ("resume", "epochs", "device", "checkpoint_every", "threads")


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, str]:
    """``{dest: option string}`` of the options that appear in `argv` (not left at their default)."""
    found = {}
    for action in parser._actions:  # noqa: SLF001 - argparse has no public list of its options
        for option in action.option_strings:
            if any(arg == option or arg.startswith(option + "=") for arg in argv):
                found[action.dest] = option
    return found


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


def resume_run(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str],
               config_keys: Sequence[str] = (), recipe: str = "") -> tuple[Path, dict[str, Any], Path, RunLock | None]:
    """The run directory to resume, its configuration, its last checkpoint and the directory's
    `RunLock`, which the caller holds until the run ends (None on ranks other than 0, which do
    not lock).

    The lock is taken first: a run that is still training there, or a directory where the lock
    cannot be written, is a `UsageError`. A run resumes only from a readable ``last.pt``; without
    one (removed, a folder in its place, or only ``config.json`` because the run was stopped
    before its first checkpoint) it is a `UsageError` saying what the directory holds, and
    nothing there is touched: a resumed run never starts over. Once every check passed, the
    temporary files that killed writes left there are removed.

    The run keeps its saved options. ``--epochs`` may change, ``--device`` may move it; any other
    option given on the command line with a value other than the saved one is a `UsageError`
    naming it, and so is a saved configuration without the recipe's `config_keys` (a run of
    recipe `recipe`). A run with nothing left to train (it finished its epochs, stopped early, or
    ``--epochs`` is not above the epochs it trained) raises `RunComplete`.
    """
    if not args.resume.strip():
        raise UsageError("--resume '' names no run directory")
    path = Path(args.resume)
    if not path.is_dir():
        raise UsageError(f"--resume {args.resume!r}: no such run directory")
    lock = lock_run_dir(path, f"--resume {args.resume!r}") if is_rank_zero() else None
    try:
        if not os.access(path, os.W_OK):
            raise UsageError(f"--resume {args.resume!r}: the run directory is not writable")
        config = _resumable_config(parser, args, argv, path, config_keys, recipe)
        if lock is not None:
            remove_temporary_files(path)
        return path, config, path / "last.pt", lock
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _resumable_config(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str],
                      path: Path, config_keys: Sequence[str], recipe: str) -> dict[str, Any]:
    """The configuration `resume_run` continues `path`'s run with (see there)."""
    last = path / "last.pt"
    if not last.is_file():
        found = "last.pt is a folder" if last.is_dir() else "there is no last.pt"
        raise UsageError(
            f"--resume {args.resume!r}: {found}, so there is no checkpoint to continue from (the directory holds "
            f"{describe_folder(path)}); a run stopped before its first checkpoint cannot be resumed: start a new "
            "run with another --log-dir (nothing here was changed)"
        )
    try:
        state = load_checkpoint(last)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    config = state.get("config") if isinstance(state, dict) else None
    if not config:
        raise UsageError(f"--resume {args.resume!r}: its checkpoint holds no recipe configuration")
    check_recipe_config(config, config_keys, last or path / CONFIG_FILE, recipe)
    config = dict(config)
    given = given_options(parser, argv)
    if "log_dir" in given:
        raise UsageError(f"{given['log_dir']} cannot move a resumed run: it continues in {path}")
    for dest, option in given.items():
        # Options outside the saved configuration (e.g. --download) do not define the run.
        if dest not in RESUMABLE_OPTIONS and dest in config and getattr(args, dest) != config[dest]:
            raise UsageError(
                f"{option} {getattr(args, dest)} differs from the run's saved {config.get(dest)!r}; a resumed run keeps "
                f"its options (only {', '.join('--' + d for d in RESUMABLE_OPTIONS[1:])} may change): start a new run "
                f"to change {option}"
            )
    for dest in given.keys() & set(RESUMABLE_OPTIONS[1:]):
        config[dest] = getattr(args, dest)
    done = len(state.get("history", []))
    if state.get("should_stop") and state.get("position") is None:
        raise RunComplete(f"run {path} is complete: it stopped early after {done} epochs; nothing to resume")
    if done >= config["epochs"]:
        more = "" if "epochs" in given else f"; pass --epochs above {done} to train it further"
        raise RunComplete(f"run {path} is complete: it trained {done} of {config['epochs']} epochs{more}")
    return config


def layout_option(text: str) -> bool | str:
    """argparse type of ``--channels-last``: ``on`` -> True, ``off`` -> False, ``auto``."""
    values = {"on": True, "off": False, "auto": "auto"}
    if text not in values:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}")
    return values[text]


def add_run_options(parser: argparse.ArgumentParser, runs_root: str) -> None:
    """Add the options every recipe has: ``--device``, ``--precision``, ``--channels-last``,
    ``--seed``, ``--log-dir`` (default: a new ``runs_root/<timestamp>``) and ``--resume``."""
    parser.add_argument("--device", type=device_option, default="auto",
                        help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--precision", choices=["auto", "32", "bf16", "16-mixed"], default="auto",
                        help="auto: what this machine computes fastest, never slower than float32 (bf16 only "
                             "on CPUs and GPUs with native bf16); 32: float32; bf16: bf16 autocast; 16-mixed: "
                             "float16 with a grad scaler, CUDA only (default: %(default)s)")
    parser.add_argument("--channels-last", type=layout_option, default="auto", metavar="{auto,on,off}",
                        help="memory format of the model and images: auto measures it with the precision once per "
                             "machine, model and batch shape and keeps the result in a cache file (the path is "
                             "printed), so every later run chooses the same (on CUDA: on for convolutions) "
                             "(default: auto)")
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="CPU threads of each process (default: the CPUs this process may use, after its "
                             "container's CPU quota, shared among torchrun's local processes). The same "
                             "command and --seed give bit-identical weights on the same machine, busy or idle; "
                             "another thread count, precision, torch version or machine changes the last bits")
    parser.add_argument("--seed", type=seed_int, default=0,
                        help=f"random seed, 0 to {MAX_SEED} (default: %(default)s)")
    parser.add_argument("--log-dir", metavar="DIR",
                        help=f"run directory (default: a new {runs_root}/<timestamp>); must not hold a run")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last checkpoint, with its options "
                             "(only --epochs, --device and --checkpoint-every may change)")
    parser.add_argument("--checkpoint-every", type=positive_int, metavar="N",
                        help="also save last.pt every N optimizer steps; a resumed run continues at the next batch "
                             "(default: at epoch ends only)")
    parser.add_argument("--val-every", type=positive_int, metavar="N",
                        help="also validate every N optimizer steps, logged at the global step (default: at epoch "
                             "ends only)")
    parser.add_argument("--max-time", type=duration, metavar="HH:MM:SS",
                        help="stop after the first step past this much training time, save the position reached "
                             "and print the command that resumes it (exit code 0)")
    parser.add_argument("--histograms", action="store_true",
                        help="log weights and gradients per layer as TensorBoard histograms every epoch")
    parser.add_argument("--fast-dev-run", action="store_true",
                        help="check the whole setup: one training and one validation batch through the model and "
                             "every callback, in a temporary directory that is removed; prints one line")


def choose_run_precision(model: torch.nn.Module, device: torch.device, example: Any,
                         config: dict[str, Any], threads: ThreadChoice | None = None) -> PrecisionChoice:
    """The precision, memory format and CPU convolution kernels a run trains with, printed in one
    line (with the `threads` the process uses, on the CPU) and recorded in `config`
    (``precision``, ``channels_last``, ``onednn``, ``precision_reason``), so that a resumed run,
    whose `config` already holds them, reuses the choice.

    ``"auto"`` in ``config["precision"]`` or ``config["channels_last"]`` is resolved by
    `trainer.precision.choose_precision` on `model` and `example` (inputs at the training batch's
    shape): measured once per machine and model, then read from its cache file; explicit values
    are kept. Under torchrun rank 0 chooses and every rank gets the same.
    """
    if config["precision"] == "16-mixed" and device.type != "cuda":
        raise UsageError("--precision 16-mixed needs a CUDA device; use auto, bf16 or 32 on the CPU")
    if "precision_reason" in config:
        choice = PrecisionChoice(config["precision"], config["channels_last"],
                                 f"saved with the run: {config['precision_reason']}", config.get("onednn", True))
    else:
        choice = (choose_precision(model, device, example, config["precision"], config["channels_last"])
                  if is_rank_zero() else None)
        choice = broadcast_object(choice)
        config.update(precision=choice.precision, channels_last=choice.channels_last, onednn=choice.onednn,
                      precision_reason=choice.reason)
    if is_rank_zero():
        cpu = f"; threads: {threads}; {WAIT_POLICY}" if threads is not None and device.type == "cpu" else ""
        print(f"{choice}{cpu}", flush=True)
    return choice


class _StopOnSignal(Callback):
    """Raises `Interrupted` at the end of the step during which a signal arrived: after every
    other callback's `on_batch_end` (the step is logged, and `ModelCheckpoint` then saves its
    position), or after a validation batch at an epoch's end. A signal during a step validation
    (``--val-every``) stops after that validation, at the end of its batch."""

    order = 1000  # after every callback that logs or saves the step

    def __init__(self) -> None:
        self.signum: int | None = None

    def on_batch_end(self, trainer, batch, outputs) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    def on_validation_batch_end(self, trainer, batch, outputs) -> None:
        if self.signum is not None and not trainer.in_step_validation:
            raise Interrupted(self.signum)


@contextlib.contextmanager
def training_interrupts(trainer: Trainer, resume_command: str) -> Iterator[None]:
    """Handle SIGINT and SIGTERM during `fit`: finish the current step, stop (callbacks get
    `on_exception` and `on_fit_end`, so logs are flushed and closed, and `ModelCheckpoint` saves
    the position reached), print how to resume and exit with 130 (SIGINT) or 143 (SIGTERM). A
    second signal stops at once (the last checkpoint is then the one written before it).

    Only this process acts on them: DataLoader workers forked from it, which inherit the handler
    until their ``worker_init_fn`` (`trainer.ignore_stop_signals`) ignores the signals, do nothing,
    so a signal to the whole process group stops the run once.
    """
    watcher = _StopOnSignal()
    trainer.add_callback(watcher)
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:  # a forked DataLoader worker, before it ignores stop signals
            return
        if watcher.signum is not None:
            raise KeyboardInterrupt
        watcher.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after the current step "
              f"(send it again to stop at once)", file=sys.stderr)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    except Interrupted as exc:
        print(f"stopped; resume with: {resume_command}", file=sys.stderr)
        raise SystemExit(128 + exc.signum) from None
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        trainer.remove_callback(watcher)


def print_run_summary(trainer: Trainer, run_dir: Path, monitor: str, label: str, mode: str = "max") -> None:
    """Print (on rank 0) the best validation value (highest, or lowest with ``mode="min"``),
    where the run was written and how to open TensorBoard."""
    if not is_rank_zero():
        return
    values = [logs[monitor] for logs in trainer.history if monitor in logs]
    if values:
        best = max(values) if mode == "max" else min(values)
        print(f"best validation {label}: {best:.4f} (epoch {values.index(best) + 1} of {len(trainer.history)})")
    print(f"run written to: {run_dir}")
    print(f"open TensorBoard: python -m trainer.board {run_dir}")


@dataclass
class RecipeParts:
    """What a recipe builds from its configuration, for `Recipe.train` to train.

    Attributes:
        model: the network (on the CPU; the trainer moves it).
        loss_fn: ``loss_fn(predictions, targets) -> scalar tensor``.
        optimizer: an optimizer over the model's parameters.
        train_loader: training batches.
        val_loader: validation batches (or None).
        example: model inputs at the training batch's shape, on which the precision probe runs.
        metrics: validation metrics, as for `Trainer`.
        scheduler: a learning-rate scheduler (or None).
        extras: whatever the recipe's `Recipe.callbacks` need from `Recipe.build` (fixed batches
            for visuals, decoded images...).
        data: the data's sizing and class names, saved in every checkpoint (``classes``,
            ``image_size``: None for each image's own size, ``input_channels``), which
            ``predict`` reads.
    """

    model: torch.nn.Module
    loss_fn: Callable[[Any, Any], torch.Tensor]
    optimizer: torch.optim.Optimizer
    train_loader: Any
    val_loader: Any
    example: Any
    metrics: dict[str, Callable[[Any, Any], torch.Tensor]] = field(default_factory=dict)
    scheduler: Any = None
    extras: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)


class Recipe:
    """The run skeleton every recipe shares; a recipe subclasses it and keeps only what is its own.

    `train` parses the command line (a parser from `build_parser`, with `add_run_options`),
    resumes a run (`resume_run`) or makes a new configuration (`new_config`), starts the process
    group under torchrun, seeds torch, lets `build` make the data, model, loss and optimizer,
    chooses the precision (`choose_run_precision`), creates the run directory (`start_run_dir`),
    adds the recipe's `callbacks`, a `CSVLogger` (``metrics.csv``), a `HistogramCallback` with
    ``--histograms`` and a `ModelCheckpoint` on `monitor` (``--checkpoint-every``), trains with
    Ctrl-C and SIGTERM handled (`training_interrupts`) and ``--val-every``, ``--max-time`` applied,
    calls `after_fit` and prints the summary. ``--fast-dev-run`` trains one batch and validates
    one in a temporary directory, then prints one line.

    Class attributes: `name` (runs go to ``runs/<name>/<timestamp>`` and the command is
    ``python -m recipes.<name>``), `monitor` and `mode` (the value `ModelCheckpoint` keeps the
    best of), `monitor_label` (its name in the summary), `config_keys` (the options that define
    a run). During `train`, ``self.args`` holds the
    parsed command line, for options that are not part of the configuration, and ``self.given``
    the options given on it (``{dest: option string}``, see `given_options`).
    """

    name: str = ""
    monitor: str = "val_loss"
    mode: str = "min"
    monitor_label: str = "loss"
    #: The parsed options that define a run (see `new_config`).
    config_keys: tuple[str, ...] = ()
    #: The options given on the command line being run (``{dest: option string}``, see
    #: `given_options`), set by `train` before `new_config`; empty outside it.
    given: dict[str, str] = {}  # noqa: RUF012 - replaced per run, never changed in place

    def build_parser(self) -> argparse.ArgumentParser:
        """The recipe's command-line options (with `add_run_options` for the shared ones)."""
        raise NotImplementedError

    def new_config(self, args: argparse.Namespace) -> dict[str, Any]:
        """The configuration of a new run from the parsed options: what defines the run, saved
        with it (config.json, checkpoints) and reused on resume. By default the options named in
        `config_keys`, and the shared ``checkpoint_every``, ``val_every`` and ``histograms``."""
        config = {key: getattr(args, key) for key in self.config_keys}
        config.update(checkpoint_every=args.checkpoint_every, val_every=args.val_every, histograms=args.histograms,
                      threads=args.threads)
        return config

    def build(self, config: dict[str, Any], device: torch.device) -> RecipeParts:
        """Data, model, loss, optimizer and the rest for `config`; bad data is a `UsageError`."""
        raise NotImplementedError

    def callbacks(self, run_dir: Path, config: dict[str, Any], parts: RecipeParts) -> list[Callback]:
        """The recipe's callbacks (a `ModelCheckpoint` is added by `train`)."""
        return []

    def after_fit(self, trainer: Trainer, config: dict[str, Any]) -> None:
        """Called after a completed fit, on every rank, before the summary."""

    def train(self, argv: list[str] | None = None) -> int:
        """Train (or resume) a run from the command line `argv`; returns the exit code."""
        argv = list(sys.argv[1:] if argv is None else argv)
        parser = self.build_parser()
        self.args = args = parser.parse_args(argv)
        self.given = given_options(parser, argv)
        fast = args.fast_dev_run
        if fast and args.resume:
            raise UsageError("--fast-dev-run checks the setup of a new run; it cannot be combined with --resume")
        run_dir = resume_from = None
        with contextlib.ExitStack() as stack:  # holds the run directory's lock until the run ends
            if args.resume:
                run_dir, config, resume_from, lock = resume_run(parser, args, argv, self.config_keys, self.name)
                if lock is not None:
                    stack.callback(lock.release)
                check_metrics_csv(run_dir / METRICS_FILE)
            else:
                if args.log_dir is not None and not fast and is_rank_zero():  # early; checked again when made
                    check_new_run_dir(args.log_dir, f"runs/{self.name}")
                config = self.new_config(args)
            try:
                device = init_distributed(resolve_device(config["device"]))
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            threads = use_threads(config.get("threads"))
            torch.manual_seed(config["seed"])
            parts = self.build(config, device)
            check_optimizer(parts.optimizer)
            if resume_from is not None:
                check_weights(parts.model, load_checkpoint(resume_from), resume_from)
            choice = choose_run_precision(parts.model, device, parts.example, config, threads)
            if fast:  # everything goes to a temporary directory, removed at the end
                run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"fast-dev-run-{self.name}-")))
            elif run_dir is None:
                run_dir, lock = start_run_dir(args.log_dir, f"runs/{self.name}", config)
                if lock is not None:
                    stack.callback(lock.release)
            callbacks = [*self.callbacks(run_dir, config, parts), CSVLogger(run_dir / METRICS_FILE),
                         *([HistogramCallback(run_dir)] if config.get("histograms") or fast else []),
                         ModelCheckpoint(run_dir, monitor=self.monitor, mode=self.mode, config=config,
                                         every_n_steps=config.get("checkpoint_every"), data=parts.data)]
            trainer = Trainer(parts.model, parts.optimizer, parts.loss_fn, callbacks=callbacks,
                              max_epochs=1 if fast else config["epochs"], device=device, metrics=parts.metrics,
                              scheduler=parts.scheduler, precision=choice, seed=config["seed"],
                              val_every_n_steps=config.get("val_every"), max_time=args.max_time,
                              limit_train_batches=1 if fast else None, limit_val_batches=1 if fast else None)
            command = f"python -m recipes.{self.name} --resume {run_dir}"
            started = time.monotonic()
            try:
                with training_interrupts(trainer, command):
                    try:
                        trainer.fit(parts.train_loader, parts.val_loader, resume_from=resume_from)
                    except TimeLimitReached as exc:
                        if is_rank_zero():
                            print(f"{exc}; resume with: {command}")
                        return 0
            except OSError as exc:  # a full disk or an unwritable folder: one line, the last checkpoint named
                if exc.errno not in WRITE_ERRNOS:
                    raise
                raise UsageError(write_error_line(exc, None if fast else run_dir, command)) from None
            if fast:
                if is_rank_zero():
                    names = ", ".join(type(cb).__name__ for cb in callbacks)
                    print(f"fast dev run passed in {time.monotonic() - started:.1f} s: one training and one "
                          f"validation batch through {type(parts.model).__name__} and {len(callbacks)} callbacks "
                          f"({names}); nothing was kept on disk")
                return 0
            self.after_fit(trainer, config)
            print_run_summary(trainer, run_dir, self.monitor, self.monitor_label, self.mode)
        return 0
