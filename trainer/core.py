"""The `Trainer`: runs the training loop and fires hooks into callbacks."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, Any, NamedTuple

import numpy as np
import torch
from torch import nn

from trainer.batch import (
    batch_size,
    describe_tensors,
    detach,
    last_output,
    move_to_device,
    peek_batch,
    split_batch,
)
from trainer.callback import HOOKS, Callback, overridden_hooks
from trainer.checkpoint import load_checkpoint, rng_state, set_rng_state
from trainer.distributed import (
    all_gather,
    all_reduce,
    broadcast_buffers,
    broadcast_object,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    is_rank_zero,
    launched_device,
    shard_loader,
)
from trainer.every import positive_int
from trainer.limits import check_batch_limit, format_duration, limited, parse_duration
from trainer.precision import (
    PrecisionChoice,
    check_channels_last,
    choose_precision,
    convolution_kernels,
    normalize_precision,
)
from trainer.resources import FitResources
from trainer.running import EpochLoss
from trainer.sampler import RESUMABLE_LOADERS, batches_from, check_epoch_reaches_workers, start_epoch

Metric = Callable[[Any, Any], torch.Tensor]

class StepOutput(NamedTuple):
    """What a train or eval step returns: the batch `loss`, the model's `predictions` and the
    `targets` that metrics compare them with (None when there are none)."""

    loss: torch.Tensor
    predictions: Any
    targets: Any = None


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def _name(fn: Any) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


class TrainingInterrupted(Exception):
    """Training stopped before its end for a reason outside the run (a signal, a time limit):
    the run can be resumed. `ModelCheckpoint` saves the position reached (see `on_exception`)."""


class TimeLimitReached(TrainingInterrupted):
    """`Trainer(max_time=...)` passed: raised after the first training step past the limit."""


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) random generators.

    Args:
        seed: the seed of every generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device) -> torch.device:
    """The `torch.device` for `device`: ``"auto"`` is CUDA when available, else the CPU; a CUDA
    device asked for on a machine without one is a ValueError.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a `torch.device`.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} was asked for but no CUDA GPU is available; use 'cpu' or 'auto'"
        )
    return resolved


class Trainer:
    """Runs the training loop and fires hooks into callbacks.

    Args:
        model: the network; moved to `device` (and to channels-last with `channels_last`).
        optimizer: a `torch.optim.Optimizer` over the model's parameters.
        loss_fn: ``loss_fn(predictions, targets) -> scalar tensor``. A model that returns a
            list (deep supervision) passes the whole list.
        callbacks: `Callback` objects. They run sorted by their ``order`` (lower first; the
            given order among equals), see `describe`.
        max_epochs: number of epochs `fit` runs.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``... Under
            torchrun, CUDA means this process's GPU (``cuda:LOCAL_RANK``).
        metrics: ``{name: metric(predictions, targets) -> 0-dim tensor}`` evaluated on
            validation batches; each returns its batch mean and is averaged weighted by batch
            size into ``logs["val_<name>"]``. With list outputs, metrics see the last one.
        scheduler: an optional LR scheduler, stepped once per epoch (`ReduceLROnPlateau` is fed
            ``val_loss``, or ``loss`` without validation data) or per optimizer step with
            ``scheduler_interval="step"``.
        scheduler_interval: ``"epoch"`` or ``"step"``: when `scheduler` steps.
        grad_clip_norm: clip the gradients' global 2-norm to this value before each step.
        accumulate_grad_batches: sum gradients over this many batches per optimizer step (a
            shorter last window of an epoch is averaged over its own batches).
        precision: ``"32"``, ``"bf16"`` (autocast on CPU and CUDA), ``"16-mixed"`` (float16
            autocast with a gradient scaler, CUDA only) or ``"auto"``: what this machine computes
            fastest, never slower than float32 (see `trainer.precision.choose_precision`), chosen
            at the start of `fit` from the first training batch and printed once. A resumed fit
            keeps the choice saved in its checkpoint. A `PrecisionChoice` made earlier (by
            `choose_precision`, or recorded with a run) applies all its settings as they are.
        seed: seeds Python, NumPy and torch at the start of the first `fit`.
        channels_last: use the channels-last memory format for the model and 4-D inputs; ``"auto"``
            decides with the precision (measured on the CPU, on for convolutional models on CUDA).
            Default: off, or the `PrecisionChoice`'s.
        val_every_n_steps: also validate every this many optimizer steps (inside epochs), logged
            at the global step. Callbacks that monitor a validation value (`EarlyStopping`,
            `ModelCheckpoint`) then decide after each validation, and `ReduceLROnPlateau` steps
            after each one (its patience counts validations).
        val_at_epoch_end: validate at the end of each epoch (default); False leaves validation
            to `val_every_n_steps`. A step validation that would fall on the epoch's last batch
            is left to the epoch's end.
        limit_train_batches, limit_val_batches: train (validate) on at most this many batches per
            epoch: an int, or a fraction of the loader's batches; for debug runs.
        max_time: stop after the first training step past this much wall time of the `fit`
            (seconds, a `timedelta` or ``"[D:]HH:MM:SS"``): callbacks get
            ``on_exception(TimeLimitReached)`` (`ModelCheckpoint` saves the position reached there)
            and `on_fit_end`, then `fit` raises `TimeLimitReached`, whose message says where it
            stopped. Under torchrun it is checked at epoch ends.

    What a callback may read (all attributes of the trainer; nothing else is part of the API):

    - the parts: `model` (wrapped in `DistributedDataParallel` under torchrun), `module` (the
      model itself), `optimizer`, `scheduler`, `loss_fn`, `metrics`, `device`, `precision`,
      `channels_last`, `precision_choice`, `callbacks` (sorted; change them with
      `add_callback`/`remove_callback` between fits), `train_loader`, `val_loader`;
    - progress: `epoch` (0-based), `max_epochs`, `global_step` (optimizer steps done),
      `start_step` (`global_step` when this `fit` began: above 0 for a resumed run), `batch_idx`
      (the batch's index in its epoch; at `on_epoch_start` the first batch the epoch trains, above
      0 when a run resumes inside it), `num_batches` (batches per epoch after
      `limit_train_batches`; None for loaders without a length), `history` (one logs dict per
      epoch), `epoch_loss` (the epoch's training loss sum on the device; read it with
      `RunningLoss`), `in_step_validation` (True during a validation run by `val_every_n_steps`);
    - shared things: `resources` (`FitResources`: e.g. one TensorBoard writer per run directory).

    What a callback may change: `should_stop = True` stops training after the current batch (or,
    under torchrun, the current epoch); `max_epochs` before `fit`. For model outputs outside the
    loop use `predict` or `eval_mode`, never the model's modes directly.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        callbacks: Iterable[Callback] = (),
        max_epochs: int = 1,
        device: str | torch.device = "auto",
        metrics: Mapping[str, Metric] | None = None,
        scheduler: Any = None,
        scheduler_interval: str = "epoch",
        grad_clip_norm: float | None = None,
        accumulate_grad_batches: int = 1,
        precision: str | PrecisionChoice = "32",
        seed: int | None = None,
        channels_last: bool | str | None = None,
        val_every_n_steps: int | None = None,
        val_at_epoch_end: bool = True,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        max_time: float | str | Any = None,
    ) -> None:
        positive_int("max_epochs", max_epochs)
        positive_int("accumulate_grad_batches", accumulate_grad_batches)
        positive_int("val_every_n_steps", val_every_n_steps, optional=True)
        if not isinstance(val_at_epoch_end, bool):
            raise ValueError(f"val_at_epoch_end must be True or False, got {val_at_epoch_end!r}")
        self.limit_train_batches = check_batch_limit("limit_train_batches", limit_train_batches)
        self.limit_val_batches = check_batch_limit("limit_val_batches", limit_val_batches)
        #: Seconds a `fit` may train (None: no limit).
        self.max_time = parse_duration(max_time) if max_time is not None else None
        if grad_clip_norm is not None and not grad_clip_norm > 0:
            raise ValueError(f"grad_clip_norm must be positive, got {grad_clip_norm!r}")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        given = precision if isinstance(precision, PrecisionChoice) else None
        if given is not None:
            if channels_last is not None and channels_last != given.channels_last:
                raise ValueError(f"channels_last={channels_last!r} contradicts the PrecisionChoice given as "
                                 f"precision (channels_last={given.channels_last}); pass one or the other")
            precision, channels_last = given.precision, given.channels_last
        precision = normalize_precision(precision)
        channels_last = check_channels_last(False if channels_last is None else channels_last)
        self.callbacks: list[Callback] = []
        for cb in callbacks:
            self.add_callback(cb)

        # The process group starts in fit; here only this process's device is worked out.
        self.device = launched_device(resolve_device(device))
        if precision == "16-mixed" and self.device.type != "cuda":
            raise ValueError("precision '16-mixed' needs a CUDA device; use 'bf16' or '32' on the CPU")
        #: ``"32"``, ``"bf16"`` or ``"16-mixed"`` (``"auto"`` until `fit` resolves it).
        self.precision: str = precision
        #: Whether the model and 4-D inputs use channels-last (``"auto"`` until `fit` resolves it).
        self.channels_last: bool | str = channels_last
        #: The choice and its reason, once ``"auto"`` was resolved or when one was given (else None).
        self.precision_choice: PrecisionChoice | None = given
        #: Whether CPU convolutions use oneDNN (False where the probe measured PyTorch's own faster).
        self.onednn = given.onednn if given is not None else True
        memory_format = torch.channels_last if channels_last is True else torch.preserve_format
        self.model: nn.Module = model.to(self.device, memory_format=memory_format)
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.metrics = dict(metrics or {})
        self.scheduler = scheduler
        self.scheduler_interval = scheduler_interval
        self.grad_clip_norm = grad_clip_norm
        self.accumulate_grad_batches = accumulate_grad_batches
        self.seed = seed
        self.max_epochs = max_epochs
        self.val_every_n_steps = val_every_n_steps
        self.val_at_epoch_end = val_at_epoch_end
        self.scaler = torch.amp.GradScaler("cuda") if precision == "16-mixed" else None

        self.epoch = 0
        self.global_step = 0
        self.start_step = 0
        self.batch_idx = 0
        self.history: list[dict[str, float]] = []
        self.should_stop = False
        self.train_loader: Iterable | None = None
        self.val_loader: Iterable | None = None
        self.num_batches: int | None = None
        self.epoch_loss = EpochLoss(self.device)
        self.in_step_validation = False
        self.resources = FitResources()
        self._hooks: dict[str, list] = {}
        # The position inside the current epoch (None between epochs): batches trained, batches
        # whose gradients wait for an optimizer step, the global step of the last step validation.
        self._batches_done: int | None = None
        self._pending = 0
        self._validated_at: int | None = None
        self._resume: dict[str, Any] | None = None  # where the next epoch starts when resuming inside it
        # The random state a resume inside the epoch starts from, once its batches are all trained:
        # taken before the epoch-end validation, which a resumed run does again from its start.
        self._epoch_end_rng: dict[str, Any] | None = None
        # Every rank's (loss sum, samples) of the epoch so far, gathered by `gather_position`, and where.
        self._gathered: tuple[tuple[int, int], list[tuple[torch.Tensor, int]]] | None = None
        self._deadline: float | None = None

    @property
    def module(self) -> nn.Module:
        """The model itself, unwrapped from `DistributedDataParallel` under torchrun. Use it for
        work done on one rank only (figures, graphs, saving): the wrapper's forward may
        communicate with the other ranks."""
        return self.model.module if isinstance(self.model, nn.parallel.DistributedDataParallel) else self.model

    # ----------------------------------------------------------------------------- callbacks
    def add_callback(self, callback: Callback) -> None:
        """Add `callback`; it runs from the next `fit` on, at its place by ``order``."""
        if not isinstance(callback, Callback):
            raise TypeError(f"callbacks must be Callback instances, got {type(callback).__name__}")
        self.callbacks.append(callback)

    def remove_callback(self, callback: Callback) -> None:
        """Remove `callback` (the very object that was added); it no longer runs from the next `fit` on."""
        for index, cb in enumerate(self.callbacks):
            if cb is callback:
                del self.callbacks[index]
                return
        raise ValueError(f"{type(callback).__name__} is not among this trainer's callbacks")

    def _active_callbacks(self) -> list[Callback]:
        # Sorted by order (stable); callbacks marked rank_zero_only run on rank 0 alone under torchrun.
        self.callbacks.sort(key=lambda cb: cb.order)
        return [cb for cb in self.callbacks if is_rank_zero() or not cb.rank_zero_only]

    def _build_dispatch(self) -> None:
        # Built once per fit, so a hook that no callback overrides costs nothing in the loop.
        active = self._active_callbacks()
        for cb in active:
            cb.trainer = self
        self._hooks = {hook: overridden_hooks(active, hook) for hook in HOOKS}

    def describe(self, file: IO[str] | None = None) -> str:
        """Print (to `file`, default stdout) and return, hook by hook in the loop's order, which
        callbacks run there: one look tells what a training run does."""
        active = self._active_callbacks()
        depth = {"on_fit_start": 0, "on_fit_end": 0, "on_exception": 0, "on_batch_start": 2, "on_batch_end": 2,
                 "on_validation_batch_end": 2}
        lines = []
        for hook in HOOKS:
            names = [type(fn.__self__).__name__ for fn in overridden_hooks(active, hook)]
            indent = "  " * depth.get(hook, 1)
            lines.append(f"{indent}{hook:<{27 - len(indent)}} {', '.join(names) or '-'}")
        text = "\n".join(lines)
        print(text, file=file)
        return text

    # ----------------------------------------------------------------------------- hooks
    def _fire(self, hook: str, *args: Any) -> None:
        for fn in self._hooks[hook]:
            fn(self, *args)

    def _fire_all(self, hook: str, *args: Any, cause: BaseException | None = None) -> None:
        """Call every callback's `hook`, even after one raised. Without a `cause`, the first error
        is raised once all ran, with the later ones as notes on it. With a `cause` (the exception
        that stopped training) the errors become notes on the cause, which is what propagates."""
        errors: list[tuple[Any, Exception]] = []
        for fn in self._hooks[hook]:
            try:
                fn(self, *args)
            except Exception as exc:  # noqa: BLE001 - every callback gets its turn; reported below
                errors.append((fn, exc))
        notes = [f"{type(fn.__self__).__name__}.{hook} also raised {type(exc).__name__}: {exc}" for fn, exc in errors]
        if cause is not None:
            for note in notes:
                cause.add_note(note)
        elif errors:
            first = errors[0][1]
            for note in notes[1:]:
                first.add_note(note)
            raise first

    def _close_resources(self, cause: BaseException | None = None) -> None:
        try:
            self.resources.close()
        except Exception as exc:  # noqa: BLE001 - never hide the exception that stopped training
            if cause is None:
                raise
            cause.add_note(f"closing the fit's resources also raised {type(exc).__name__}: {exc}")

    def _resolve_precision(self, loader: Iterable, saved: dict[str, Any] | None) -> None:
        """Turn ``"auto"`` precision or memory format into the machine's choice (rank 0 probes,
        every rank applies the same), or into the choice a resumed checkpoint saved."""
        if saved is not None:
            choice = PrecisionChoice(saved["precision"], saved["channels_last"], "saved in the checkpoint",
                                     saved.get("onednn", True))
        elif is_rank_zero():
            inputs = split_batch(peek_batch(loader))[0]
            choice = choose_precision(self.module, self.device, inputs, self.precision, self.channels_last)
        else:
            choice = None
        choice = broadcast_object(choice)
        if self.precision != "auto" and choice.precision != self.precision:  # explicit values always win
            choice = dataclasses.replace(choice, precision=self.precision)
        if self.channels_last != "auto" and choice.channels_last != self.channels_last:
            choice = dataclasses.replace(choice, channels_last=self.channels_last)
        self.precision, self.channels_last, self.precision_choice = choice.precision, choice.channels_last, choice
        self.onednn = choice.onednn
        if choice.precision == "16-mixed" and self.device.type != "cuda":
            raise ValueError("precision '16-mixed' needs a CUDA device; use 'bf16' or '32' on the CPU")
        self.module.to(memory_format=torch.channels_last if choice.channels_last else torch.contiguous_format)
        self.scaler = torch.amp.GradScaler("cuda") if choice.precision == "16-mixed" else None
        if is_rank_zero():
            print(f"Trainer: {choice}")

    # ----------------------------------------------------------------------------- forward passes
    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of the chosen precision (a no-op context for "32")."""
        if self.precision == "32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def to_device(self, batch: Any) -> Any:
        """`batch` (tensors, or nested tuples, lists and dicts of them) on the trainer's device, 4-D
        tensors channels-last when the run uses it: the one way inputs reach the model."""
        return move_to_device(batch, self.device, self.channels_last)

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[nn.Module]:
        """Evaluation as the whole framework does it: yields the unwrapped `module` in eval mode,
        under no grad, the run's autocast and convolution kernels; the module's training mode is
        restored afterwards. Validation, figures and PR curves all go through it."""
        model = self.module
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.autocast(), convolution_kernels(self.onednn):
                yield model
        finally:
            model.train(was_training)

    def predict(self, inputs: Any) -> Any:
        """The model's output for `inputs` (moved to the device by `to_device`), in `eval_mode`;
        left on the device, in the autocast dtype."""
        with self.eval_mode() as model:
            return model(self.to_device(inputs))

    # ----------------------------------------------------------------------------- steps
    def train_step(self, batch: Any) -> StepOutput:
        """Forward pass and loss of one training batch; override for other batch layouts.

        Runs under autocast when mixed precision is on; the trainer does the backward pass.
        """
        return self._forward(self.model, batch)

    def eval_step(self, batch: Any) -> StepOutput:
        """Forward pass and loss of one validation batch (eval mode, no grad); override as needed.

        Uses the unwrapped `module`: under torchrun the `DistributedDataParallel` wrapper would
        communicate with the other ranks, which may hold fewer validation batches.
        """
        return self._forward(self.module, batch)

    def _forward(self, model: nn.Module, batch: Any) -> StepOutput:
        inputs, targets = split_batch(batch)
        predictions = model(inputs)
        try:
            loss = self.loss_fn(predictions, targets)
        except Exception as exc:
            # PyTorch's own message rarely says which call failed or what it was given.
            exc.add_note(f"raised by the loss function {_name(self.loss_fn)}(predictions, targets) with predictions "
                         f"{describe_tensors(predictions)} and targets {describe_tensors(targets)}")
            raise
        return StepOutput(loss, predictions, targets)

    # ----------------------------------------------------------------------------- loop
    def fit(
        self,
        train_loader: Iterable,
        val_loader: Iterable | None = None,
        resume_from: str | os.PathLike | None = None,
    ) -> list[dict[str, float]]:
        """Train for `max_epochs` epochs (or until a callback sets `should_stop`).

        With `resume_from` (a checkpoint written by `ModelCheckpoint`), training continues where
        the checkpoint was taken, with the saved weights, optimizer, scheduler, random
        generators, history and callback states: at the epoch after the saved one, or, for a
        checkpoint taken inside an epoch, at that epoch's next batch, without loading the batches
        before it (see `trainer.sampler.batches_from`; a loader that cannot start late resumes at
        the end of the epoch, with one warning). A run that had stopped early stays stopped; a
        `CosineAnnealingLR` over the saved run's epochs, resumed with another `max_epochs`,
        decays from its current rate to its minimum at the new last epoch. Calling `fit` again
        on the same trainer (with a larger `max_epochs`, or after a `TimeLimitReached`) continues
        where the last call ended, without reseeding. Returns `history`: one logs dict per epoch.

        After an exception, every callback gets `on_exception` then `on_fit_end` (also when one
        of them raises: its error becomes a note on the training exception), and the training
        exception propagates. Without one, an error in `on_fit_end` propagates after every
        callback's `on_fit_end` ran.
        """
        state = load_checkpoint(resume_from, resume=True) if resume_from is not None else None
        self.device = init_distributed(self.device)  # under torchrun: the process group starts here
        if is_distributed():
            if not isinstance(self.model, nn.parallel.DistributedDataParallel):
                device_ids = [self.device.index] if self.device.type == "cuda" else None
                self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
            train_loader = shard_loader(train_loader, train=True)
            val_loader = shard_loader(val_loader, train=False) if val_loader is not None else None
        if "auto" in (self.precision, self.channels_last):
            self._resolve_precision(train_loader, (state or {}).get("precision"))
        if state is not None:
            self.load_state_dict(state)
        elif self._batches_done is not None:  # a fit that stopped inside an epoch: continue there
            self._resume = {"epoch": self.epoch, "batches": self._batches_done,
                            "rng": self._epoch_end_rng if self._epoch_end_rng is not None else rng_state()}
            self._epoch_end_rng = None
        if self.scaler is not None and not getattr(self.optimizer, "_step_supports_amp_scaling", False):
            warnings.warn(
                f"precision '16-mixed' with a {type(self.optimizer).__name__} that is not fused: the grad scaler "
                f"waits on the GPU at every step to check for infinite gradients; create the optimizer with "
                f"fused=True to keep the loop free of host syncs",
                RuntimeWarning, stacklevel=2,
            )
        self.train_loader, self.val_loader = train_loader, val_loader
        check_epoch_reaches_workers(train_loader)
        try:
            length = len(train_loader)  # type: ignore[arg-type]
        except TypeError:
            length = None
        self.num_batches = limited("limit_train_batches", self.limit_train_batches, length)
        self._build_dispatch()
        if state is None:
            self.should_stop = False  # a resumed run keeps the stop it saved (load_state_dict)
        if self.seed is not None and state is None and not self.history and self.global_step == 0:
            seed_everything(self.seed)  # only a fresh start: a second fit() continues the random streams
        self.start_step = self.global_step
        with convolution_kernels(self.onednn):
            try:
                self._fire("on_fit_start")
                self._deadline = time.monotonic() + self.max_time if self.max_time is not None else None
                self._run_epochs(train_loader, val_loader)
            except BaseException as exc:
                self._fire_all("on_exception", exc, cause=exc)
                self._fire_all("on_fit_end", cause=exc)
                self._close_resources(cause=exc)
                raise
            try:
                self._fire_all("on_fit_end")
            finally:
                self._close_resources()
        return self.history

    def _run_epochs(self, train_loader: Iterable, val_loader: Iterable | None) -> None:
        for epoch in range(len(self.history), self.max_epochs):  # continue after done epochs
            resume, self._resume = (self._resume if self._resume and self._resume["epoch"] == epoch else None), None
            if self.should_stop and resume is None:  # a resumed run that had stopped early
                break
            self.epoch = epoch
            self.batch_idx = resume["batches"] if resume else 0
            self._fire("on_epoch_start")
            logs = self._train_epoch(train_loader, val_loader, resume)
            if val_loader is not None and self.val_at_epoch_end and self._validated_at != self.global_step:
                self._epoch_end_rng = rng_state()  # a stop during the validation saves this one
                logs.update(self._validate(val_loader))
            self._epoch_end_rng = None
            self._step_scheduler_on_epoch(logs)
            logs["lr"] = self.optimizer.param_groups[0]["lr"]
            self.history.append(logs)
            self._batches_done = None
            self._fire("on_epoch_end", logs)
            self.resources.flush()
            over = self._deadline is not None and time.monotonic() >= self._deadline
            if is_distributed():  # every rank stops at the same epoch
                flags = torch.tensor([float(self.should_stop), float(over)], device=self.device)
                stop, over = (bool(flag) for flag in all_reduce(flags, "max").tolist())
                self.should_stop = stop
                if over and not stop and epoch + 1 < self.max_epochs:
                    raise self._time_limit_reached()
            if self.should_stop:
                break

    def _train_epoch(self, loader: Iterable, val_loader: Iterable | None,
                     resume: dict[str, Any] | None) -> dict[str, float]:
        model, optimizer, accumulate = self.model, self.optimizer, self.accumulate_grad_batches
        batch_start, batch_end = self._hooks["on_batch_start"], self._hooks["on_batch_end"]
        val_every, last = self.val_every_n_steps, self.num_batches
        single = not is_distributed()
        model.train()
        start_epoch(loader, self.epoch)  # seeded orders and augmentations: fresh and reproducible per epoch
        epoch_loss = self.epoch_loss
        first = resume["batches"] if resume else 0
        if resume is None:
            epoch_loss.reset()
            optimizer.zero_grad(set_to_none=True)
            self._pending, self._validated_at = 0, None
        self._batches_done = first
        if self.should_stop or (last is not None and first >= last):  # nothing left to train in this epoch
            batches: Iterable = ()
        else:  # started late (after `first` batches) only now, so that the start is used by this pass
            batches = batches_from(loader, first)
            if batches is None:
                warnings.warn(
                    f"{type(loader).__name__} cannot start an epoch at a given batch, so this run resumes at the end "
                    f"of epoch {self.epoch + 1}: the batches after batch {first} of it are skipped. "
                    f"{RESUMABLE_LOADERS}",
                    RuntimeWarning, stacklevel=4,
                )
                batches = ()
            elif self.limit_train_batches is not None:
                batches = itertools.islice(batches, last - first)
        iterator = iter(batches)
        if resume is not None and "rng" in resume:
            # Again after iter(): a DataLoader draws its workers' base seed from the generator.
            set_rng_state(resume["rng"])
        deadline = self._deadline
        for batch_idx, batch in enumerate(iterator, start=first):
            self.batch_idx = batch_idx
            batch = self.to_device(batch)
            for fn in batch_start:
                fn(self, batch)
            with self.autocast():
                out = self.train_step(batch)
            loss = out.loss
            if accumulate > 1:
                loss = loss / accumulate
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            self._pending += 1
            stepped = self._pending == accumulate
            if stepped:
                self._optimizer_step()
                self._pending = 0
            n = batch_size(out.predictions if out.targets is None else out.targets)
            detached = out.loss.detach()
            epoch_loss.add(detached, n)
            self._batches_done = batch_idx + 1
            if stepped and val_every is not None:
                self._maybe_validate_at_step(val_loader, last_batch=batch_idx + 1 == last)
            if batch_end:
                outputs = StepOutput(detached, detach(out.predictions), out.targets)
                for fn in batch_end:
                    fn(self, batch, outputs)
            if deadline is not None and single and time.monotonic() >= deadline:
                raise self._time_limit_reached()
            if self.should_stop and single:  # under torchrun: at the epoch's end
                break
        if self._pending:
            if self._pending != accumulate:  # a shorter last window: average over its own batches
                for param in model.parameters():
                    if param.grad is not None:
                        param.grad.mul_(accumulate / self._pending)
            self._optimizer_step()
            self._pending = 0
            if val_every is not None:
                self._maybe_validate_at_step(val_loader, last_batch=True)
        if epoch_loss.samples == 0:
            raise ValueError("the training loader yielded no batches")
        if is_distributed():
            count = torch.tensor(float(epoch_loss.samples), device=self.device)
            loss_total, samples = all_reduce(torch.stack([epoch_loss.total, count])).tolist()
        else:
            loss_total, samples = epoch_loss.total.item(), epoch_loss.samples
        mean_loss = loss_total / samples
        if not math.isfinite(mean_loss):
            raise NonFiniteLossError(
                f"training loss is {mean_loss} in epoch {self.epoch + 1}/{self.max_epochs} (by global step "
                f"{self.global_step}); lower the learning rate, clip gradients or check the data"
            )
        return {"loss": mean_loss}

    def _maybe_validate_at_step(self, val_loader: Iterable | None, last_batch: bool) -> None:
        """After an optimizer step: validate if the global step is a multiple of
        `val_every_n_steps`, unless the epoch-end validation follows at once (`last_batch`)."""
        if (val_loader is not None and self.global_step % self.val_every_n_steps == 0
                and not (last_batch and self.val_at_epoch_end)):
            self._step_validation(val_loader)

    def _step_validation(self, val_loader: Iterable) -> None:
        """A validation inside the epoch (`val_every_n_steps`); `ReduceLROnPlateau` steps after it."""
        self.in_step_validation = True
        try:
            logs = self._validate(val_loader)
        finally:
            self.in_step_validation = False
        self._validated_at = self.global_step
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(logs["val_loss"])

    def _time_limit_reached(self) -> TimeLimitReached:
        where = f"batch {self.batch_idx + 1}" + (f" of {self.num_batches}" if self.num_batches else "")
        return TimeLimitReached(f"time limit {format_duration(self.max_time)} reached after global step "
                                f"{self.global_step} (epoch {self.epoch + 1}, {where})")

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            if self.grad_clip_norm is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.grad_clip_norm is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if (self.scheduler is not None and self.scheduler_interval == "step"
                and not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
            self.scheduler.step()

    def _step_scheduler_on_epoch(self, logs: dict[str, float]) -> None:
        if self.scheduler is None:
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if "val_loss" in logs:
                self.scheduler.step(logs["val_loss"])
            elif self.val_every_n_steps is None:  # with step validations it steps after each of them
                self.scheduler.step(logs["loss"])
        elif self.scheduler_interval == "epoch":
            self.scheduler.step()

    # ----------------------------------------------------------------------------- state
    def stateful_callbacks(self) -> dict[str, Callback]:
        """Callbacks with `state_dict`/`load_state_dict`, keyed by class name (suffixed with
        ``#N`` for the N-th further callback of the same class)."""
        found, seen = {}, {}
        for cb in self.callbacks:
            if callable(getattr(cb, "state_dict", None)) and callable(getattr(cb, "load_state_dict", None)):
                name = type(cb).__qualname__
                seen[name] = seen.get(name, -1) + 1
                found[f"{name}#{seen[name]}" if seen[name] else name] = cb
        return found

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training exactly: model, optimizer, scheduler, grad
        scaler, epochs done, global step, history, random generators, callback states and, when
        taken inside an epoch, the `position` there: the epoch, the batches trained, every rank's
        training loss sums of the epoch so far, gradients waiting for an optimizer step and the
        step of the last step validation. Taken during the validation at an epoch's end, the
        random generators are those from before it, since a resumed run validates again.

        Under torchrun the loss sums of every rank are there when `gather_position` was called
        at this position (`ModelCheckpoint` does); otherwise only the calling rank's, and a run
        resumed from it counts them for every rank, so that epoch's training loss is an estimate.
        """
        model = self.module
        return {
            "model": model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epochs_done": len(self.history),
            "max_epochs": self.max_epochs,
            "should_stop": self.should_stop,
            "global_step": self.global_step,
            "history": [dict(logs) for logs in self.history],
            "rng": self._epoch_end_rng if self._epoch_end_rng is not None else rng_state(),
            "precision": {"precision": self.precision, "channels_last": self.channels_last, "onednn": self.onednn},
            "callbacks": {key: cb.state_dict() for key, cb in self.stateful_callbacks().items()},
            "position": self._position(),
        }

    def gather_position(self) -> None:
        """Under torchrun, collect every rank's training loss sums of the epoch so far, so that a
        `state_dict` taken next at this position (on rank 0) holds them all and a run resumed
        from it logs that epoch's loss exactly. Every rank must call it at the same point of the
        loop; outside an epoch, and in a single process, it does nothing."""
        if self._batches_done is None or not is_distributed():
            return
        local = torch.stack([self.epoch_loss.total.detach().to(torch.float64),
                             torch.tensor(float(self.epoch_loss.samples), dtype=torch.float64, device=self.device)])
        ranks = [(sums[0].to(self.epoch_loss.total.dtype), int(sums[1].item())) for sums in all_gather(local)]
        self._gathered = ((self.epoch, self._batches_done), ranks)

    def _position(self) -> dict[str, Any] | None:
        if self._batches_done is None:
            return None
        pending = self._pending
        here = (self.epoch, self._batches_done)
        if self._gathered is not None and self._gathered[0] == here:
            ranks = self._gathered[1]
        else:
            ranks = [(self.epoch_loss.total, self.epoch_loss.samples)]
        return {
            "epoch": self.epoch,
            "batches": self._batches_done,
            # One entry per rank (rank order): the epoch's training loss sum so far and its samples.
            "loss_totals": torch.stack([total.detach().clone() for total, _ in ranks]),
            "loss_samples": [samples for _, samples in ranks],
            "pending": pending,
            "grads": [None if p.grad is None else p.grad.detach().clone() for p in self.module.parameters()]
            if pending else None,
            "validated_at": self._validated_at,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from `state_dict` (see `fit(resume_from=...)`)."""
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
            self._stretch_schedule(state.get("max_epochs"))
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.history = [dict(logs) for logs in state["history"]]
        self.global_step = state["global_step"]
        self.should_stop = bool(state.get("should_stop", False))
        self.epoch = max(len(self.history) - 1, 0)
        self._resume, self._batches_done, self._epoch_end_rng, self._gathered = None, None, None, None
        position = state.get("position")
        if position is not None:
            self.epoch, self._batches_done = position["epoch"], position["batches"]
            if "loss_totals" in position:
                totals, samples = position["loss_totals"], position["loss_samples"]
            else:  # written before every rank's sums were saved: the saving rank's alone
                totals, samples = position["loss_total"].reshape(1), [position["loss_samples"]]
            # This rank's sums; saved without them (by one rank only, or by another number of ranks), the saving rank's.
            rank = get_rank() if len(samples) == get_world_size() else 0
            self.epoch_loss.total = totals[rank].clone().to(self.device)
            self.epoch_loss.samples = samples[rank]
            self._pending, self._validated_at = position["pending"], position["validated_at"]
            for param, grad in zip(self.module.parameters(), position["grads"] or ()):
                param.grad = None if grad is None else grad.to(param.device)
            self._resume = {"epoch": self.epoch, "batches": self._batches_done, "rng": state["rng"]}
        set_rng_state(state["rng"])
        saved = state.get("callbacks", {})
        for key, cb in self.stateful_callbacks().items():
            if key in saved:
                cb.load_state_dict(saved[key])

    def _stretch_schedule(self, saved_epochs: int | None) -> None:
        # A cosine schedule over the saved run's epochs, resumed with more (or fewer) epochs, would
        # climb back up after its end; it continues instead from the current rate down to its
        # minimum at the new last epoch (the chained cosine step follows T_max from here on).
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR
        if (isinstance(self.scheduler, cosine) and self.scheduler_interval == "epoch" and saved_epochs
                and self.scheduler.T_max == saved_epochs != self.max_epochs):
            self.scheduler.T_max = self.max_epochs

    def validate(self, loader: Iterable) -> dict[str, float]:
        """Evaluate on `loader` (in `eval_mode`) and return ``val_loss`` and ``val_<metric>``.

        Fires `on_validation_start`, `on_validation_batch_end` and `on_validation_end`.
        """
        if not self._hooks:
            self._build_dispatch()
        return self._validate(loader)

    def _validate(self, loader: Iterable) -> dict[str, float]:
        # The unwrapped model: evaluation needs no communication, so ranks may hold uneven shards.
        broadcast_buffers(self.module)
        batch_end = self._hooks["on_validation_batch_end"]
        self._fire("on_validation_start")
        loss_sum = torch.zeros((), device=self.device)
        metric_sums = {name: torch.zeros((), device=self.device) for name in self.metrics}
        samples = 0
        if self.limit_val_batches is not None:
            try:
                length = len(loader)  # type: ignore[arg-type]
            except TypeError:
                length = None
            loader = itertools.islice(loader, limited("limit_val_batches", self.limit_val_batches, length))
        with self.eval_mode():
            for batch in loader:
                batch = self.to_device(batch)
                out = self.eval_step(batch)
                n = batch_size(out.predictions if out.targets is None else out.targets)
                loss_sum.add_(out.loss.detach().float(), alpha=n)
                if metric_sums:
                    if out.targets is None:
                        raise ValueError(
                            "metrics need targets, but eval_step returned StepOutput.targets=None"
                        )
                    final = last_output(out.predictions)
                    for name, fn in self.metrics.items():
                        metric_sums[name].add_(fn(final, out.targets).detach().float(), alpha=n)
                samples += n
                for fn in batch_end:
                    fn(self, batch, out)
        # One device sync (and under torchrun one reduction) for all values of the epoch.
        sums = torch.stack([loss_sum, *metric_sums.values(), torch.tensor(float(samples), device=self.device)])
        *values, samples = all_reduce(sums).tolist()
        if samples == 0:
            raise ValueError("the validation loader yielded no batches")
        logs = {"val_loss": values[0] / samples}
        logs.update({f"val_{name}": v / samples for name, v in zip(metric_sums, values[1:])})
        self._fire("on_validation_end", logs)
        return logs
