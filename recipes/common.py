"""The run skeleton every recipe shares: `Recipe` and `RecipeParts`, the precision line and the
summary. The command line, run folders and signals live in `recipes.cli`, `recipes.run_dir` and
`recipes.interrupts`; what recipes imported from here before is still importable here."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch

from models.losses import MASK_TYPES, mask_type_of_loss
from recipes import WAIT_POLICY
from recipes.cli import (
    FLOAT32_MAX,
    MAX_SEED,
    CommandLine,
    RecipeArgumentParser,
    add_run_options,
    device_option,
    duration,
    fraction,
    layout_option,
    non_negative_float,
    non_negative_int,
    parse_command_line,
    positive_float,
    positive_int,
    resume_command,
    run_cli,
    seed_int,
)
from recipes.config import PATH, PER_COMMAND, RunConfig
from recipes.errors import RunComplete, UsageError
from recipes.interrupts import Interrupted, training_interrupts
from recipes.run_checks import check_metrics_csv, check_optimizer, check_weights
from recipes.run_dir import (
    CONFIG_FILE,
    METRICS_FILE,
    WRITE_ERRNOS,
    RunFolderGuard,
    check_new_run_dir,
    describe_folder,
    describe_holder,
    hold_run_dir,
    holds_run,
    lock_run_dir,
    make_run_dir,
    resume_run,
    start_run_dir,
    write_error_line,
)
from trainer import BatchLoadError, Callback, TimeLimitReached, Trainer, resolve_device, seed_everything
from trainer.callbacks import CSVLogger, HistogramCallback, ModelCheckpoint
from trainer.checkpoint import load_checkpoint
from trainer.distributed import init_distributed, is_rank_zero
from trainer.openmp import WaitPolicy
from trainer.precision import PrecisionChoice
from trainer.precision_probe import resolve_choice
from trainer.run_lock import RunLock
from trainer.threads import ThreadChoice, use_threads

__all__ = [
    "CONFIG_FILE",
    "FLOAT32_MAX",
    "MAX_SEED",
    "MASK_TYPES",
    "METRICS_FILE",
    "PATH",
    "PER_COMMAND",
    "WRITE_ERRNOS",
    "CommandLine",
    "Interrupted",
    "Recipe",
    "RecipeArgumentParser",
    "RecipeParts",
    "RunComplete",
    "RunConfig",
    "UsageError",
    "add_run_options",
    "check_new_run_dir",
    "choose_run_precision",
    "describe_folder",
    "describe_holder",
    "device_option",
    "duration",
    "fraction",
    "holds_run",
    "layout_option",
    "lock_run_dir",
    "make_run_dir",
    "non_negative_float",
    "non_negative_int",
    "parse_command_line",
    "positive_float",
    "positive_int",
    "print_run_summary",
    "recorded_data",
    "resume_command",
    "resume_run",
    "run_cli",
    "seed_int",
    "start_details",
    "start_line",
    "start_run_dir",
    "training_interrupts",
    "write_error_line",
]


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


def choose_run_precision(
    model: torch.nn.Module, device: torch.device, example: Any, config: RunConfig, threads: ThreadChoice | None = None
) -> PrecisionChoice:
    """The precision, memory format and CPU convolution kernels a run trains with, printed in one
    short line (`start_line`, with the `threads` the process uses and the OpenMP waiting, on the
    CPU; with ``config.verbose`` the `start_details` below it) and recorded in `config`
    (``precision``, ``channels_last``, ``onednn``, ``precision_reason``), so that a resumed run,
    whose `config` already holds them, reuses the choice.

    ``"auto"`` in ``config["precision"]`` or ``config["channels_last"]`` is resolved by the
    trainer's own decision (`trainer.precision_probe.resolve_choice`) on `model` and `example` (inputs at
    the training batch's shape): measured once per machine and model, then read from its cache file; explicit values
    are kept. Under torchrun rank 0 chooses and every rank gets the same.

    Args:
        model: the network (probed on a copy).
        device: where it trains.
        example: model inputs at the training batch's shape, for the probe.
        config: the run's configuration (new or resumed).
        threads: the CPU thread count the process uses (`trainer.threads.use_threads`).
    """
    if config.precision == "16-mixed" and device.type != "cuda":
        raise UsageError("--precision 16-mixed needs a CUDA device; use auto, bf16 or 32 on the CPU")
    saved = None
    if config.precision_reason is not None:
        saved = PrecisionChoice(
            config.precision,
            config.channels_last,  # type: ignore[arg-type]
            f"saved with the run: {config.precision_reason}",
            True if config.onednn is None else config.onednn,
            "saved with the run",
        )
    cpu = threads if device.type == "cpu" else None

    def announce(choice: PrecisionChoice) -> None:
        print(start_line(choice, cpu, WAIT_POLICY if cpu is not None else None), flush=True)
        if config.verbose:
            for key, value in start_details(choice, cpu).items():
                print(f"  {key}: {value}", flush=True)

    choice = resolve_choice(model, device, lambda: example, config.precision, config.channels_last, saved, announce)
    if saved is None:  # a new run records its choice; a resumed one keeps the one it recorded
        config.update(
            precision=choice.precision,
            channels_last=choice.channels_last,
            onednn=choice.onednn,
            precision_reason=choice.reason,
        )
    return choice


def data_error_line(exc: BatchLoadError, last: Path | None, command: str) -> str:
    """One line for a batch that could not be loaded during a run: the batch, the reason, and how
    to go on once the data is fixed (the checkpoint to resume from), or that nothing was saved."""
    if last is not None and last.is_file():
        return f"{exc}; the run stopped and can resume from {last} once the data is fixed: {command}"
    return f"{exc}; the run stopped before its first checkpoint"


def print_run_summary(trainer: Trainer, run_dir: Path, monitor: str, label: str, mode: str = "max") -> None:
    """Print (on rank 0) the best validation value (highest, or lowest with ``mode="min"``),
    where the run was written and how to open TensorBoard."""
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


@dataclass(kw_only=True)
class RecipeParts:
    """What a recipe builds from its configuration, for `Recipe.train` to train. A recipe whose
    callbacks need more from `Recipe.build` (fixed batches for visuals, decoded images...)
    returns a subclass with those as typed fields (a ``@dataclass(kw_only=True)``).

    Attributes:
        model: the network (on the CPU; the trainer moves it).
        loss_fn: ``loss_fn(predictions, targets) -> scalar tensor``.
        optimizer: an optimizer over the model's parameters.
        train_loader: training batches.
        val_loader: validation batches (or None).
        example: model inputs at the training batch's shape, on which the precision probe runs.
        metrics: validation metrics, as for `Trainer`.
        scheduler: a learning-rate scheduler (or None).
        data: what the checkpoints record of the data, which ``predict`` reads (see
            docs/extending.md): ``classes`` (a name per output map), ``image_size`` (the square
            side images were resized to; None: each image's own size), ``input_channels``,
            ``mask_type`` (how the outputs are read, one of `MASK_TYPES`; left out, `Recipe.train`
            records what the run trains, see `recorded_data`) and ``ignore_index`` (label maps:
            the value of pixels of no class). Plain values only.
    """

    model: torch.nn.Module
    loss_fn: Callable[[Any, Any], torch.Tensor]
    optimizer: torch.optim.Optimizer
    train_loader: Any
    val_loader: Any
    example: Any
    metrics: dict[str, Callable[[Any, Any], torch.Tensor]] = field(default_factory=dict)
    scheduler: Any = None
    data: dict[str, Any] = field(default_factory=dict)


#: Wrappers deeper than this around a training set are not looked into for its ``mask_mode``.
_MAX_WRAPPERS = 8


def _trained_mask_type(parts: RecipeParts) -> tuple[str, str] | None:
    """``(mask_type, where it was read)`` of what `parts` trains (see `recorded_data`), or None."""
    dataset = getattr(parts.train_loader, "dataset", None)
    for _ in range(_MAX_WRAPPERS):  # a Subset (or another wrapper) keeps its data set in .dataset
        mode = getattr(dataset, "mask_mode", None)
        if isinstance(mode, str) and mode in MASK_TYPES:
            return mode, f"its training data ({type(dataset).__name__} with mask_mode {mode!r})"
        dataset = getattr(dataset, "dataset", None)
        if dataset is None:
            break
    kind = mask_type_of_loss(parts.loss_fn)
    if kind is not None:
        return kind, f"its loss ({type(parts.loss_fn).__name__})"
    return None


def recorded_data(parts: RecipeParts) -> dict[str, Any]:
    """``parts.data`` as the run's checkpoints record it: with ``mask_type``, how the model's outputs
    are read (one of `MASK_TYPES`), added where the recipe leaves it out and the run tells it.

    The run tells it by what it trains on: the training set's ``mask_mode`` (a
    `trainer_datasets.SegmentationFolder` or `SegmentationStream`, also inside a ``Subset``: the
    loader's ``dataset``), else its loss (`models.losses.mask_type_of_loss`: ``CEDiceLoss`` and
    ``nn.CrossEntropyLoss`` are ``"labels"``, ``BCEDiceLoss`` and ``nn.BCEWithLogitsLoss``
    ``"binary"``). A run that tells neither records none, and ``predict`` refuses its checkpoints
    until the recipe gives it. A ``mask_type`` the recipe gives outside `MASK_TYPES`, or other
    than what the run trains, is a `UsageError`, before anything is written.

    Args:
        parts: what the recipe's `Recipe.build` returned.
    """
    data = dict(parts.data)
    given = data.get("mask_type")
    if given is not None and given not in MASK_TYPES:
        raise UsageError(
            f"RecipeParts.data gives mask_type {given!r}; it is 'binary' (a sigmoid per class: a mask each, "
            "which may overlap) or 'labels' (a softmax over the classes: one label map), or left out to be "
            "read from the training data or the loss"
        )
    trained = _trained_mask_type(parts)
    if trained is not None:
        kind, source = trained
        if given is not None and given != kind:
            raise UsageError(
                f"RecipeParts.data gives mask_type {given!r}, but the run trains for {kind!r} by {source}; "
                f"give {kind!r} or leave mask_type out"
            )
        data["mask_type"] = kind
    return data


ConfigT = TypeVar("ConfigT", bound=RunConfig)
PartsT = TypeVar("PartsT", bound=RecipeParts)


class Recipe(Generic[ConfigT, PartsT]):
    """The run skeleton every recipe shares; a recipe subclasses it and keeps only what is its own.

    `train` parses the command line (`build_parser`), resumes a run (`recipes.run_dir.resume_run`)
    or makes a new configuration (`new_config`), starts the process group under torchrun, seeds
    Python, NumPy and torch once with ``config.seed``, lets `build` make the data, model, loss and
    optimizer (what the checkpoints record of the data completed by `recorded_data`), chooses the
    precision (`choose_run_precision`), creates the run directory
    (`recipes.run_dir.start_run_dir`: ``config.json``, a lock), adds to the recipe's `callbacks`
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
    #: Instead of `config_class`: the names of the recipe's own options, saved untyped.
    config_keys: ClassVar[tuple[str, ...]] = ()

    def build_parser(self) -> argparse.ArgumentParser:
        """The recipe's command-line options (with `add_run_options` for the shared ones)."""
        raise NotImplementedError

    def configuration_class(self) -> type[RunConfig]:
        """`config_class`, or a `RunConfig` subclass with a field of any type per name in `config_keys`."""
        if self.config_class is not RunConfig or not self.config_keys:
            return self.config_class
        own = [(key, Any) for key in self.config_keys if key not in RunConfig.saved_fields()]
        return make_dataclass(f"{type(self).__name__}Config", own, bases=(RunConfig,), kw_only=True, eq=False)

    def new_config(self, command: CommandLine) -> ConfigT:
        """The configuration of a new run from the parsed command line: what defines the run,
        saved with it (config.json, checkpoints) and reused on resume. By default each field of
        the configuration class from the option of the same name; override it to refuse option
        combinations (``command.given`` tells which options were given) or fill in defaults.

        Args:
            command: the parsed command line.
        """
        return self.configuration_class().from_options(command.args)  # type: ignore[return-value]

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
                run_dir, config, resume_from, lock = resume_run(command, self.configuration_class(), self.name)
                hold_run_dir(stack, lock, type(self).__module__)
                check_metrics_csv(run_dir / METRICS_FILE)
            else:
                if args.log_dir is not None and not fast and is_rank_zero():  # early; checked again when made
                    check_new_run_dir(args.log_dir, f"runs/{self.name}")
                config = self.new_config(command)
            return self._run(stack, config, run_dir, resume_from, lock)

    def _run(
        self,
        stack: contextlib.ExitStack,
        config: Any,
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
        threads = use_threads(config.threads)
        seed_everything(config.seed)
        parts = self.build(config, device)
        parts.data = recorded_data(parts)
        check_optimizer(parts.optimizer)
        if resume_from is not None:
            check_weights(parts.model, load_checkpoint(resume_from), resume_from)
        choice = choose_run_precision(parts.model, device, parts.example, config, threads)
        if fast:  # everything goes to a temporary directory, removed at the end
            run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"fast-dev-run-{self.name}-")))
        elif run_dir is None:
            record = start_details(choice, threads if device.type == "cpu" else None)
            run_dir, lock = start_run_dir(config.log_dir, f"runs/{self.name}", config, record)
            hold_run_dir(stack, lock, type(self).__module__)
        callbacks = [
            RunFolderGuard(lock, type(self).__module__, config.checkpoint_every),
            *self.callbacks(run_dir, config, parts),
            CSVLogger(run_dir / METRICS_FILE),
            *([HistogramCallback(run_dir)] if config.histograms or fast else []),
            ModelCheckpoint(
                run_dir,
                monitor=self.monitor,
                mode=self.mode,
                config=dict(config),
                every_n_steps=config.checkpoint_every,
                data=parts.data,
            ),
        ]
        trainer = Trainer(
            parts.model,
            parts.optimizer,
            parts.loss_fn,
            callbacks=callbacks,
            max_epochs=1 if fast else config.epochs,
            device=device,
            metrics=parts.metrics,
            scheduler=parts.scheduler,
            precision=choice,
            val_every_n_steps=config.val_every,
            max_time=config.max_time,
            limit_train_batches=1 if fast else None,
            limit_val_batches=1 if fast else None,
        )
        command = resume_command(type(self).__module__, run_dir)
        started = time.monotonic()
        last = None if fast else run_dir / "last.pt"
        try:
            with training_interrupts(trainer, command, last):
                try:
                    trainer.fit(parts.train_loader, parts.val_loader, resume_from=resume_from)
                except TimeLimitReached as exc:
                    if is_rank_zero():
                        print(f"{exc}; resume with: {command}")
                    return 0
        except BatchLoadError as exc:  # a file gone or changed on disk: the position before it is saved
            raise UsageError(data_error_line(exc, last, command)) from None
        except OSError as exc:  # a full disk or an unwritable folder: one line, the last checkpoint named
            if exc.errno not in WRITE_ERRNOS:
                raise
            raise UsageError(write_error_line(exc, None if fast else run_dir, command)) from None
        if fast:
            if is_rank_zero():
                names = ", ".join(type(cb).__name__ for cb in callbacks)
                print(
                    f"fast dev run passed in {time.monotonic() - started:.1f} s: one training and one "
                    f"validation batch through {type(parts.model).__name__} and {len(callbacks)} callbacks "
                    f"({names}); nothing was kept on disk"
                )
            return 0
        self.after_fit(trainer, config)
        print_run_summary(trainer, run_dir, self.monitor, self.monitor_label, self.mode)
        return 0
