"""What the recipes share: run directories, option types and one-line command-line errors."""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch

from trainer import Callback, NonFiniteLossError, Trainer
from trainer.checkpoint import load_checkpoint
from trainer.distributed import broadcast_object, is_rank_zero
from trainer.precision import PrecisionChoice, choose_precision


class UsageError(Exception):
    """Bad input from the command line or the data: reported as one line, exit code 2."""


class RecipeArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class Interrupted(Exception):
    """Training was stopped by a signal after finishing its current step."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def _bounded(convert: Callable[[str], float], minimum: float, inclusive: bool, wanted: str) -> Callable[[str], Any]:
    """An argparse type: `convert`, then a finite value above (or, if `inclusive`, at) `minimum`."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    parse.__name__ = wanted
    return parse


positive_int = _bounded(int, 0, False, "a positive integer")
non_negative_int = _bounded(int, 0, True, "an integer >= 0")
positive_float = _bounded(float, 0.0, False, "a positive number")
non_negative_float = _bounded(float, 0.0, True, "a number >= 0")


def holds_run(path: Path) -> bool:
    """Whether `path` already holds a run (TensorBoard event files or checkpoints)."""
    return bool(glob.glob(str(path / "**" / "events.out.tfevents.*"), recursive=True)
                or glob.glob(str(path / "**" / "*.pt"), recursive=True))


def make_run_dir(log_dir: str | None, default_root: str) -> Path:
    """The directory of a new run, created empty and writable.

    Without `log_dir`, a fresh ``<default_root>/<timestamp>`` that no earlier run used. An
    explicit `log_dir` that already holds a run is refused, so no run is ever overwritten.
    """
    if log_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path, suffix = Path(default_root) / stamp, 1
        while path.exists():
            path, suffix = Path(default_root) / f"{stamp}-{suffix}", suffix + 1
    else:
        path = Path(log_dir)
        if path.exists() and not path.is_dir():
            raise UsageError(f"--log-dir {str(path)!r} is a file, not a directory")
        if path.is_dir() and holds_run(path):
            raise UsageError(f"--log-dir {str(path)!r} already holds a run; choose a new directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the log directory {str(path)!r}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"the log directory {str(path)!r} is not writable")
    return path


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a recipe's `main`, turning bad input into one line on stderr and exit code 2."""
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


CONFIG_FILE = "config.json"


def start_run_dir(log_dir: str | None, default_root: str, config: dict[str, Any]) -> Path:
    """Create a new run's directory (see `make_run_dir`) and record its configuration there
    first, so a run killed before its first checkpoint can still be resumed.

    Under torchrun, rank 0 creates it and every rank gets the same path (or the same error).
    """
    result: Path | UsageError | None = None
    if is_rank_zero():
        try:
            result = make_run_dir(log_dir, default_root)
            tmp = result / f".{CONFIG_FILE}.tmp"
            tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
            os.replace(tmp, result / CONFIG_FILE)
        except UsageError as exc:
            result = exc
    result = broadcast_object(result)
    if isinstance(result, UsageError):
        raise result
    return result


class RunComplete(Exception):
    """A resumed run has nothing left to train: reported as one line, exit code 0."""


#: Options a resumed run may take anew: how far to train and where, not what the run is.
RESUMABLE_OPTIONS = ("resume", "epochs", "device")


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, str]:
    """``{dest: option string}`` of the options that appear in `argv` (not left at their default)."""
    found = {}
    for action in parser._actions:  # noqa: SLF001 - argparse has no public list of its options
        for option in action.option_strings:
            if any(arg == option or arg.startswith(option + "=") for arg in argv):
                found[action.dest] = option
    return found


def resume_run(parser: argparse.ArgumentParser, args: argparse.Namespace,
               argv: list[str]) -> tuple[Path, dict[str, Any], Path | None]:
    """The run directory to resume, its configuration and its last checkpoint (None when the run
    was stopped before its first checkpoint: it then starts over in the same directory).

    The run keeps its saved options. ``--epochs`` may change, ``--device`` may move it; any other
    option given on the command line with a value other than the saved one is a `UsageError`
    naming it. A run with nothing left to train (it finished its epochs, stopped early, or
    ``--epochs`` is not above the epochs it trained) raises `RunComplete`.
    """
    path = Path(args.resume)
    if not path.is_dir():
        raise UsageError(f"--resume {args.resume!r}: no such run directory")
    last, state = path / "last.pt", None
    if last.is_file():
        try:
            state = load_checkpoint(last)
        except (OSError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        config = state.get("config")
    elif (path / CONFIG_FILE).is_file():
        config, last = json.loads((path / CONFIG_FILE).read_text()), None
    else:
        raise UsageError(f"--resume {args.resume!r}: neither last.pt nor {CONFIG_FILE} there; not a run of this recipe")
    if not config:
        raise UsageError(f"--resume {args.resume!r}: its checkpoint holds no recipe configuration")
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
    if state is not None:
        done = len(state.get("history", []))
        if state.get("should_stop"):
            raise RunComplete(f"run {path} is complete: it stopped early after {done} epochs; nothing to resume")
        if done >= config["epochs"]:
            more = "" if "epochs" in given else f"; pass --epochs above {done} to train it further"
            raise RunComplete(f"run {path} is complete: it trained {done} of {config['epochs']} epochs{more}")
    return path, config, last


def layout_option(text: str) -> bool | str:
    """argparse type of ``--channels-last``: ``on`` -> True, ``off`` -> False, ``auto``."""
    values = {"on": True, "off": False, "auto": "auto"}
    if text not in values:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}")
    return values[text]


def add_precision_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--precision {auto,32,bf16,16-mixed}`` and ``--channels-last {auto,on,off}`` (both
    default auto) to a recipe's parser."""
    parser.add_argument("--precision", choices=["auto", "32", "bf16", "16-mixed"], default="auto",
                        help="auto: what this machine computes fastest, never slower than float32 (bf16 only "
                             "on CPUs and GPUs with native bf16, after a short probe); 32: float32; bf16: "
                             "bf16 autocast; 16-mixed: float16 with a grad scaler, CUDA only (default: %(default)s)")
    parser.add_argument("--channels-last", type=layout_option, default="auto", metavar="{auto,on,off}",
                        help="memory format of the model and images: auto measures it with the precision (on "
                             "CUDA: on for convolutions). A run with --precision and --channels-last both given "
                             "probes nothing, so reruns with the same seed are bit-identical (default: auto)")


def choose_run_precision(model: torch.nn.Module, device: torch.device, example: Any,
                         config: dict[str, Any]) -> PrecisionChoice:
    """The precision, memory format and CPU convolution kernels a run trains with, printed in one
    line and recorded in `config` (``precision``, ``channels_last``, ``onednn``,
    ``precision_reason``), so that a resumed run, whose `config` already holds them, reuses the
    choice instead of probing again.

    ``"auto"`` in ``config["precision"]`` or ``config["channels_last"]`` is resolved by
    `trainer.precision.choose_precision` with a short probe on `model` and `example` (its
    inputs); explicit values are kept. Under torchrun rank 0 chooses and every rank gets the same.
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
        print(choice, flush=True)
    return choice


class _StopOnSignal(Callback):
    """Raises `Interrupted` at the end of the step during which a signal arrived."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def on_batch_end(self, trainer, batch, outputs) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    on_validation_batch_end = on_batch_end


@contextlib.contextmanager
def training_interrupts(trainer: Trainer, resume_command: str) -> Iterator[None]:
    """Handle SIGINT and SIGTERM during `fit`: finish the current step, stop (callbacks get
    `on_exception` and `on_fit_end`, so logs are flushed and closed), print how to resume and
    exit with 130 (SIGINT) or 143 (SIGTERM). The last checkpoint is the one written at the end
    of the last completed epoch. A second signal stops at once.
    """
    watcher = _StopOnSignal()
    trainer.callbacks.insert(0, watcher)

    def handler(signum, frame):
        if watcher.signum is not None:
            raise KeyboardInterrupt
        watcher.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after the current step "
              f"(send it again to stop at once)", file=sys.stderr)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except Interrupted as exc:
        print(f"stopped; resume with: {resume_command}", file=sys.stderr)
        raise SystemExit(128 + exc.signum) from None
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        trainer.callbacks.remove(watcher)


def print_run_summary(trainer: Trainer, run_dir: Path, monitor: str, label: str) -> None:
    """Print (on rank 0) the best validation value, where the run was written and how to open
    TensorBoard."""
    if not is_rank_zero():
        return
    values = [logs[monitor] for logs in trainer.history if monitor in logs]
    if values:
        best = max(values)
        print(f"best validation {label}: {best:.4f} (epoch {values.index(best) + 1} of {len(trainer.history)})")
    print(f"run written to: {run_dir}")
    print(f"open TensorBoard: python -m trainer.board {run_dir}")
