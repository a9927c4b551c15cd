"""The run skeleton every recipe shares: `Recipe`, the precision line and the summary. What a
recipe builds is a `recipes.parts.RecipeParts`; the command line, run folders and signals live in
`recipes.cli`, `recipes.run_dir` and `recipes.interrupts`."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import torch

from recipes import WAIT_POLICY
from recipes.cli import CommandLine, parse_command_line, resume_command
from recipes.config import RunConfig
from recipes.errors import UsageError
from recipes.interrupts import training_interrupts
from recipes.parts import RecipeParts, recorded_data
from recipes.run_checks import check_metrics_csv, check_optimizer, check_weights
from recipes.run_dir import (
    METRICS_FILE,
    WRITE_ERRNOS,
    RunFolderGuard,
    check_new_run_dir,
    hold_run_dir,
    resume_run,
    start_run_dir,
    write_error_line,
    write_run_config,
)
from trainer import BatchLoadError, Callback, TimeLimitReached, Trainer, resolve_device, seed_everything
from trainer.callbacks import CSVLogger, HistogramCallback, ModelCheckpoint, TensorBoardCallback
from trainer.callbacks.checkpoint import CHECKPOINT_LAST
from trainer.checkpoint import load_checkpoint
from trainer.distributed import init_distributed, is_rank_zero
from trainer.openmp import WaitPolicy
from trainer.precision import PrecisionChoice
from trainer.runs.lock import RunLock
from trainer.runs.threads import ThreadChoice, use_threads

__all__ = ["Recipe", "RunStart", "print_run_summary", "start_details", "start_line", "trainer_precision"]


def start_line(choice: PrecisionChoice, threads: ThreadChoice | None = None, wait: WaitPolicy | None = None) -> str:
    """The line a run prints at its start: what was chosen and why in a few words (the summaries
    of `choice`, `threads` and `wait`, which leave out measurements and paths), e.g.
    ``precision: 32, contiguous (no native bf16, measured); 2 threads (CPU affinity); OpenMP threads spin``.

    Args:
        choice: the precision, memory format and convolution kernels.
        threads: the CPU thread count (None: not shown, as on a GPU).
        wait: how OpenMP threads wait (None: not shown).
    """
    return "; ".join([str(choice), *([str(threads)] if threads is not None else []), *([wait.summary] if wait else [])])


def start_details(choice: PrecisionChoice, threads: ThreadChoice | None = None) -> dict[str, str]:
    """Why the run's precision, threads and OpenMP waiting were chosen, in full (the CPU's
    features, each setting's measured time, the cache file, the CPUs counted, the load): what
    ``--verbose`` prints below the start line and a new run's ``config.json`` records, under the
    keys ``precision_reason``, ``threads_reason`` and ``wait_policy``.

    Args:
        choice: the precision, memory format and convolution kernels.
        threads: the CPU thread count (None: neither it nor the OpenMP waiting, as on a GPU).
    """
    details = {"precision_reason": choice.reason}
    if threads is not None:
        details["threads_reason"] = f"{threads.threads} thread{'s' if threads.threads != 1 else ''}: {threads.reason}"
        details["wait_policy"] = WAIT_POLICY.reason
    return details


def trainer_precision(config: RunConfig) -> str | PrecisionChoice:
    """The precision a run's `Trainer` is given: a resumed run's recorded choice (``precision``,
    ``channels_last``, ``onednn`` and ``precision_reason`` of its configuration), which it keeps;
    else ``--precision`` as asked (``"auto"``: the trainer resolves it at the start of `fit`).

    Args:
        config: the run's configuration (new or resumed).
    """
    if config.precision_reason is None:
        return config.precision
    return PrecisionChoice(
        config.precision,
        config.channels_last is True,
        f"saved with the run: {config.precision_reason}",
        True if config.onednn is None else config.onednn,
        "saved with the run",
    )


class RunStart(Callback):
    """The start of a recipe's fit, once the trainer has its precision (``"auto"`` is resolved
    at the start of `fit`; `trainer.precision_probe.resolve_choice` is that one decision): prints
    the start line (`start_line`, with the `threads` and the OpenMP waiting on the CPU; with
    ``config.verbose`` the `start_details` below it) on rank 0, and a new run records the
    trainer's choice (``precision``, ``channels_last``, ``onednn``, ``precision_reason``) in
    `config`, in the options its `ModelCheckpoint` saves and its `TensorBoardCallback` shows,
    and, with the `start_details`, in `run_dir`'s ``config.json``; a resumed run, whose
    `config` holds them, keeps the choice it recorded (`trainer_precision`).

    Args:
        config: the run's configuration (new or resumed).
        threads: the CPU thread count the process uses (None: not shown, as on a GPU).
        run_dir: the folder whose ``config.json`` records a new run's choice (None: nothing
            written, as with ``--fast-dev-run``).
    """

    order = -2000  # before every callback that prints or writes

    def __init__(self, config: RunConfig, threads: ThreadChoice | None = None, run_dir: Path | None = None) -> None:
        self.config, self.threads, self.run_dir = config, threads, run_dir

    def on_fit_start(self, trainer: Trainer) -> None:
        choice = trainer.precision_choice
        if choice is None:  # precision and memory format both given: nothing was left to choose
            asked = f"precision {trainer.precision} as asked"
            choice = PrecisionChoice(trainer.precision, trainer.channels_last is True, asked, summary="as asked")
        if self.config.precision_reason is None:
            self._record(trainer, choice)
        if is_rank_zero():
            print(start_line(choice, self.threads, WAIT_POLICY if self.threads is not None else None), flush=True)
            if self.config.verbose:
                for key, value in start_details(choice, self.threads).items():
                    print(f"  {key}: {value}", flush=True)

    def _record(self, trainer: Trainer, choice: PrecisionChoice) -> None:
        chosen = {
            "precision": choice.precision,
            "channels_last": choice.channels_last,
            "onednn": choice.onednn,
            "precision_reason": choice.reason,
        }
        self.config.update(**chosen)
        for callback in trainer.callbacks:  # the options they were given before the choice was made
            options: dict[str, Any] | None
            if isinstance(callback, ModelCheckpoint):
                options = callback.config
            elif isinstance(callback, TensorBoardCallback):
                options = callback.hparams
            else:
                continue
            if options is not None:
                options.update({key: value for key, value in chosen.items() if key in options})
        if self.run_dir is not None and is_rank_zero():
            write_run_config(self.run_dir, self.config, start_details(choice, self.threads))


def data_error_line(exc: BatchLoadError, last: Path | None, command: str) -> str:
    """One line for a batch that could not be loaded during a run: the batch, the reason, and how
    to go on once the data is fixed (the checkpoint to resume from), or that nothing was saved."""
    if last is not None and last.is_file():
        return f"{exc}; the run stopped and can resume from {last} once the data is fixed: {command}"
    return f"{exc}; the run stopped before its first checkpoint"


def print_run_summary(trainer: Trainer, run_dir: Path, monitor: str, label: str, mode: str = "max") -> None:
    """Print (on rank 0) the best validation value (highest, or lowest with ``mode="min"``),
    where the run was written and how to open TensorBoard.

    Args:
        trainer: the trainer that ran the fit (its `history` holds each epoch's logs).
        run_dir: the run directory.
        monitor: the logs value to report (``val_iou``...).
        label: its name in the line (``IoU``).
        mode: ``"max"`` or ``"min"``: whether the highest or the lowest value is the best.
    """
    if not is_rank_zero():
        return
    # NaN (a metric with nothing to measure, such as IoU with no labelled pixel) is never the best
    values = [
        (logs[monitor], epoch)
        for epoch, logs in enumerate(trainer.history, start=1)
        if monitor in logs and not math.isnan(logs[monitor])
    ]
    if values:
        pick = max if mode == "max" else min
        best = pick(value for value, _ in values)
        epoch = next(e for value, e in values if value == best)
        print(f"best validation {label}: {best:.4f} (epoch {epoch} of {len(trainer.history)})")
    print(f"run written to: {run_dir}")
    print(f"open TensorBoard: python -m trainer.board {run_dir}")


ConfigT = TypeVar("ConfigT", bound=RunConfig)
PartsT = TypeVar("PartsT", bound=RecipeParts)


class Recipe(Generic[ConfigT, PartsT]):
    """The run skeleton every recipe shares; a recipe subclasses it and keeps only what is its own.

    `train` parses the command line (`build_parser`), resumes a run (`recipes.run_dir.resume_run`)
    or makes a new configuration (`new_config`), starts the process group under torchrun, seeds
    Python, NumPy and torch once with ``config.seed``, lets `build` make the data, model, loss and
    optimizer (what the checkpoints record of the data completed by `recorded_data`), creates the
    run directory (`recipes.run_dir.start_run_dir`: ``config.json``, a lock), gives the trainer the
    precision (`trainer_precision`: ``"auto"`` is resolved by the trainer, and `RunStart` prints and
    records its choice at the start of the fit), adds to the recipe's `callbacks`
    a `CSVLogger` (``metrics.csv``), a `HistogramCallback` with ``--histograms`` and a
    `ModelCheckpoint` on `monitor` (``last.pt``, ``best.pt``; ``--checkpoint-every``), trains
    with Ctrl-C and SIGTERM handled (`training_interrupts`) and ``--val-every``, ``--max-time``
    applied, calls `after_fit` and prints the summary. ``--fast-dev-run`` trains one batch and
    validates one in a temporary directory, then prints one line.

    Class attributes: `name` (runs go to ``runs/<name>/<timestamp>``), `config_class` (the
    recipe's `RunConfig` subclass), `monitor` and `mode` (the value `ModelCheckpoint` keeps the
    best of), `monitor_label` (its name in the summary).
    """

    name: str = ""
    monitor: str = "val_loss"
    mode: str = "min"
    monitor_label: str = "loss"
    #: The recipe's configuration: a `RunConfig` subclass with a field per option of its own.
    config_class: type[RunConfig] = RunConfig

    def build_parser(self) -> argparse.ArgumentParser:
        """The recipe's command-line options (with `add_run_options` for the shared ones)."""
        raise NotImplementedError

    def new_config(self, command: CommandLine) -> ConfigT:
        """The configuration of a new run from the parsed command line: what defines the run,
        saved with it (config.json, checkpoints) and reused on resume. By default each field of
        the configuration class from the option of the same name; override it to refuse option
        combinations (``command.given`` tells which options were given) or fill in defaults.

        Args:
            command: the parsed command line.
        """
        return self.config_class.from_options(command.args)  # type: ignore[return-value]

    def build(self, config: ConfigT, device: torch.device) -> PartsT:
        """Data, model, loss, optimizer and the rest for `config`; bad data is a `UsageError`.

        Args:
            config: the run's configuration (new or resumed).
            device: the device the run trains on.
        """
        raise NotImplementedError

    def callbacks(self, run_dir: Path, config: ConfigT, parts: PartsT) -> list[Callback]:
        """The recipe's callbacks (`train` adds `CSVLogger`, `HistogramCallback` and `ModelCheckpoint`).

        Args:
            run_dir: the run directory.
            config: the run's configuration.
            parts: what `build` returned.
        """
        return []

    def after_fit(self, trainer: Trainer, config: ConfigT) -> None:
        """Called after a completed fit, on every rank, before the summary.

        Args:
            trainer: the trainer that ran the fit (its `history` holds each epoch's logs).
            config: the run's configuration.
        """

    def train(self, argv: list[str] | None = None) -> int:
        """Train (or resume) a run from the command line `argv`; returns the exit code.

        Args:
            argv: the command-line arguments (default: ``sys.argv[1:]``).
        """
        command = parse_command_line(self.build_parser(), sys.argv[1:] if argv is None else argv)
        args = command.args
        fast = args.fast_dev_run
        if fast and args.resume:
            raise UsageError("--fast-dev-run checks the setup of a new run; it cannot be combined with --resume")
        run_dir = resume_from = lock = None
        with contextlib.ExitStack() as stack:  # holds the run directory's lock until the run ends
            if args.resume:
                run_dir, config, resume_from, lock = resume_run(command, self.config_class, self.name)
                hold_run_dir(stack, lock, type(self).__module__)
                check_metrics_csv(run_dir / METRICS_FILE)
            else:
                if args.log_dir is not None and not fast and is_rank_zero():  # early; checked again when made
                    check_new_run_dir(args.log_dir, f"runs/{self.name}")
                config = self.new_config(command)
            return self._run(stack, cast("ConfigT", config), run_dir, resume_from, lock)

    def _run(
        self,
        stack: contextlib.ExitStack,
        config: ConfigT,
        run_dir: Path | None,
        resume_from: Path | None,
        lock: RunLock | None = None,
    ) -> int:
        """`train` once the configuration is known: build, choose the precision, fit, summarise."""
        fast = config.fast_dev_run
        try:
            device = init_distributed(resolve_device(config.device))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if config.precision == "16-mixed" and device.type != "cuda":
            raise UsageError("--precision 16-mixed needs a CUDA device; use auto, bf16 or 32 on the CPU")
        threads = use_threads(config.threads)
        seed_everything(config.seed)
        parts = self.build(config, device)
        parts.data = recorded_data(parts)
        check_optimizer(parts.optimizer)
        if resume_from is not None:
            check_weights(parts.model, load_checkpoint(resume_from), resume_from)
        new_run = run_dir is None and not fast
        if fast:  # everything goes to a temporary directory, removed at the end
            run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"fast-dev-run-{self.name}-")))
        elif run_dir is None:
            run_dir, lock = start_run_dir(config.log_dir, f"runs/{self.name}", config)
            hold_run_dir(stack, lock, type(self).__module__)
        start = RunStart(config, threads if device.type == "cpu" else None, run_dir if new_run else None)
        callbacks = self._all_callbacks(run_dir, config, parts, lock)
        trainer = self._trainer(config, parts, device, [start, *callbacks])
        started = time.monotonic()
        if not self._fit(trainer, config, parts, run_dir, resume_from):
            return 0
        if fast:
            if is_rank_zero():
                print(fast_run_line(parts.model, callbacks, time.monotonic() - started))
            return 0
        self.after_fit(trainer, config)
        print_run_summary(trainer, run_dir, self.monitor, self.monitor_label, self.mode)
        return 0

    def _all_callbacks(self, run_dir: Path, config: ConfigT, parts: PartsT, lock: RunLock | None) -> list[Callback]:
        """The recipe's `callbacks` with those every run has: the folder's guard, `CSVLogger`,
        `HistogramCallback` (``--histograms``) and `ModelCheckpoint`."""
        fast = config.fast_dev_run
        return [
            RunFolderGuard(lock, type(self).__module__, config.checkpoint_every),
            *self.callbacks(run_dir, config, parts),
            CSVLogger(run_dir / METRICS_FILE),
            *([HistogramCallback(run_dir)] if config.histograms or fast else []),
            ModelCheckpoint(
                run_dir,
                monitor=self.monitor,
                mode=self.mode,
                config=config.saved(),
                every_n_steps=config.checkpoint_every,
                data=parts.data,
            ),
        ]

    def _trainer(
        self,
        config: ConfigT,
        parts: PartsT,
        device: torch.device,
        callbacks: list[Callback],
    ) -> Trainer:
        """The `Trainer` of the run (one batch of each kind with ``--fast-dev-run``), given the
        precision of `trainer_precision`; `RunStart` says what it is."""
        fast = config.fast_dev_run
        precision = trainer_precision(config)
        trainer = Trainer(
            parts.model,
            parts.optimizer,
            parts.loss_fn,
            callbacks=callbacks,
            max_epochs=1 if fast else config.epochs,
            device=device,
            metrics=parts.metrics,
            scheduler=parts.scheduler,
            scheduler_interval=parts.scheduler_interval,
            precision=precision,
            channels_last=None if isinstance(precision, PrecisionChoice) else config.channels_last,
            val_every_n_steps=config.val_every,
            max_time=config.max_time,
            limit_train_batches=1 if fast else None,
            limit_val_batches=1 if fast else None,
        )
        trainer.announce_precision = lambda choice: None  # RunStart prints it in the run's start line
        return trainer

    def _fit(self, trainer: Trainer, config: ConfigT, parts: PartsT, run_dir: Path, resume_from: Path | None) -> bool:
        """Fit with the signals handled; False when ``--max-time`` stopped it (the resume command
        printed). A batch that cannot be loaded, a full disk or an unwritable folder is a `UsageError`."""
        fast = config.fast_dev_run
        command = resume_command(type(self).__module__, run_dir)
        last = None if fast else run_dir / CHECKPOINT_LAST
        try:
            with training_interrupts(trainer, command, last):
                try:
                    trainer.fit(parts.train_loader, parts.val_loader, resume_from=resume_from)
                except TimeLimitReached as exc:
                    if is_rank_zero():
                        print(f"{exc}; resume with: {command}")
                    return False
        except BatchLoadError as exc:  # a file gone or changed on disk: the position before it is saved
            raise UsageError(data_error_line(exc, last, command)) from None
        except OSError as exc:  # a full disk or an unwritable folder: one line, the last checkpoint named
            if exc.errno not in WRITE_ERRNOS:
                raise
            raise UsageError(write_error_line(exc, None if fast else run_dir, command)) from None
        return True


def fast_run_line(model: torch.nn.Module, callbacks: list[Callback], seconds: float) -> str:
    """The one line ``--fast-dev-run`` prints once its batches went through `model` and `callbacks`."""
    names = ", ".join(type(cb).__name__ for cb in callbacks)
    return (
        f"fast dev run passed in {seconds:.1f} s: one training and one validation batch through "
        f"{type(model).__name__} and {len(callbacks)} callbacks ({names}); nothing was kept on disk"
    )
