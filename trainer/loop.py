"""`TrainingLoop`: the epochs of a trainer's fits and the progress they make. It owns that progress
(epoch, global step, batch, history), the position inside the epoch (`LoopPosition`),
the epoch's running loss (`trainer.epoch_loss.EpochLoss`) and the scheduler rule
(`trainer.scheduling.SchedulerStepping`); the `Trainer` holds the parts (model, optimizer,
callbacks, precision) and reads its progress here.

Everything the loop uses per batch (the device mover, the autocast context, the dispatch table,
the scheduler rule) is built once per fit, before the first batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from trainer.batch import StepOutput, batch_size, detach, last_output, loaded, started
from trainer.callback import FitResources
from trainer.epoch_loss import EpochLoss, non_finite_loss
from trainer.options import batches_taken
from trainer.scheduling import SchedulerStepping

if TYPE_CHECKING:  # pragma: no cover
    from trainer.core import Trainer
    from trainer.errors import TimeLimitReached


@dataclasses.dataclass
class LoopPosition:
    """The position inside the current epoch; one object, reset between epochs.

    Attributes:
        batches_done: batches of the epoch trained so far; None between epochs.
        pending: batches whose gradients wait for an optimizer step (gradient accumulation).
        validated_at: the global step of the last validation inside the epoch (None: none yet).
        resume: where the next epoch starts when a run resumes inside it: ``{"epoch", "batches",
            "rng"}``, or None.
        epoch_end_rng: the random state a resume inside the epoch starts from once its batches are
            all trained: taken before the epoch-end validation, which a resumed run does again.
    """

    batches_done: int | None = None
    pending: int = 0
    validated_at: int | None = None
    resume: dict[str, Any] | None = None
    epoch_end_rng: dict[str, Any] | None = None

    @property
    def inside_epoch(self) -> bool:
        """Whether an epoch is under way (started and not yet ended)."""
        return self.batches_done is not None

    def start_epoch(self, first: int, fresh: bool) -> None:
        """Enter an epoch at batch `first`; a `fresh` epoch (not resumed inside) has no pending
        gradients and no validation yet."""
        if fresh:
            self.pending, self.validated_at = 0, None
        self.batches_done = first

    def end_epoch(self) -> None:
        """Leave the epoch: nothing left to resume inside it."""
        self.batches_done, self.epoch_end_rng = None, None

    def rng_now(self, device: torch.device) -> dict[str, Any]:
        """The generator states a checkpoint taken now holds: before the epoch-end validation, which
        a resumed run does again, those from before it."""
        from trainer.rng import rng_state

        return self.epoch_end_rng if self.epoch_end_rng is not None else rng_state(device)

    def take_resume(self, epoch: int) -> dict[str, Any] | None:
        """The resume point if it is inside `epoch` (then forgotten), else None."""
        resume, self.resume = (self.resume if self.resume and self.resume["epoch"] == epoch else None), None
        return resume


class TrainingLoop:
    """The epochs of one trainer's fits, and their progress (which the `Trainer` shows as its
    attributes ``epoch``, ``global_step``, ``batch_idx``... for callbacks to read).

    Args:
        trainer: the trainer whose parts the loop runs; every hook gets it.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.epoch = self.global_step = self.start_step = self.batch_idx = 0
        self.history: list[dict[str, float]] = []
        self.should_stop = self.in_step_validation = False
        self.train_loader: Iterable | None = None
        self.val_loader: Iterable | None = None
        self.num_batches: int | None = None
        self.epoch_loss = EpochLoss(trainer.device)
        self.resources = FitResources()
        self.position = LoopPosition()
        self.scheduling = SchedulerStepping(None, "epoch", False)
        self.deadline: float | None = None
        self.fitting = False  # inside fit: its resources and start step are the fit's
        self.single = True  # one process: the time limit and a stop act after any batch

    # ----------------------------------------------------------------------------- a fit
    def prepare(self, train_loader: Iterable, val_loader: Iterable | None, fresh: bool) -> None:
        """What the loop reads, built once per fit: loaders, batch count, dispatch table, scheduler rule."""
        from trainer.distributed import check_even_batches, is_distributed
        from trainer.sampler import check_epoch_reaches_workers

        trainer = self.trainer
        self.train_loader, self.val_loader = train_loader, val_loader
        check_epoch_reaches_workers(train_loader)
        self.num_batches = batches_taken(train_loader, trainer.limit_train_batches, "limit_train_batches")
        check_even_batches(self.num_batches, trainer.device)  # uneven ranks would wait on each other
        trainer._callbacks.rebuild()
        validates = val_loader is not None and (trainer.val_at_epoch_end or trainer.val_every_n_steps is not None)
        self.scheduling = SchedulerStepping(trainer.scheduler, trainer.scheduler_interval, validates, self.global_step)
        if fresh:
            self.should_stop = False  # a resumed run keeps the stop it saved (load_state_dict)
        if trainer.seed is not None and fresh and not self.history and self.global_step == 0:
            from trainer.rng import seed_everything

            seed_everything(trainer.seed)  # only a fresh start: a second fit() continues the random streams
        self.start_step = self.global_step
        self.single = not is_distributed()  # under torchrun: time limit and stop at the epoch's end

    def run(self, train_loader: Iterable, val_loader: Iterable | None) -> None:
        """The hooks around the epochs: every callback's ``on_exception`` and ``on_fit_end`` run."""
        callbacks = self.trainer._callbacks
        self.fitting = True
        try:
            callbacks.fire("on_fit_start")
            max_time = self.trainer.max_time
            self.deadline = time.monotonic() + max_time if max_time is not None else None
            self._run_epochs(train_loader, val_loader)
        except BaseException as exc:
            callbacks.fire_all("on_exception", exc, cause=exc)
            callbacks.fire_all("on_fit_end", cause=exc)
            self.fitting = False
            self.resources.close(cause=exc)
            raise
        try:
            callbacks.fire_all("on_fit_end")
        finally:
            self.fitting = False
            self.resources.close()

    def validate(self, loader: Iterable) -> dict[str, float]:
        """`Trainer.validate`: inside a fit with the fit's resources, outside one with its own."""
        self.trainer._callbacks.rebuild()
        if self.fitting:
            return self._validate(loader)
        from trainer.distributed import alone

        start_step, self.start_step = self.start_step, self.global_step  # a writer's purge step (resumed)
        try:
            with alone() if loader is not self.val_loader else contextlib.nullcontext():  # any rank, alone
                logs = self._validate(loader)
        except BaseException as exc:
            self.resources.close(cause=exc)
            raise
        finally:
            self.start_step = start_step
        self.resources.close()
        return logs

    def continue_in_place(self) -> None:
        """A `fit` called again after one that stopped inside an epoch continues there."""
        pos = self.position
        if pos.inside_epoch:
            pos.resume = {"epoch": self.epoch, "batches": pos.batches_done, "rng": pos.rng_now(self.trainer.device)}
            pos.epoch_end_rng = None

    def _run_epochs(self, train_loader: Iterable, val_loader: Iterable | None) -> None:
        for epoch in range(len(self.history), self.max_epochs):  # continue after done epochs
            resume = self.position.take_resume(epoch)
            if self.should_stop and resume is None:  # a resumed run that had stopped early
                break
            batches = loaded(self._start_epoch(epoch, train_loader, resume), _training_batch(epoch), self.batch_idx)
            try:
                for batch_idx, batch in enumerate(batches, start=self.batch_idx):
                    if self._train_batch(batch_idx, batch, val_loader):
                        break
            finally:
                batches.close()  # the loader's iterator, and its worker processes, end here on every path
            self._end_epoch(val_loader)
            if self._stop_after_epoch(epoch):
                break

    @property
    def max_epochs(self) -> int:
        return self.trainer.max_epochs

    # ----------------------------------------------------------------------------- epoch start
    def _start_epoch(self, epoch: int, loader: Iterable, resume: dict[str, Any] | None) -> Iterator[Any]:
        """Fire ``on_epoch_start`` and return the epoch's batches (from the resume point, if any)."""
        from trainer.sampler import start_epoch

        trainer = self.trainer
        self.epoch = epoch
        first = resume["batches"] if resume else 0
        self.batch_idx = first
        trainer._callbacks.fire("on_epoch_start")
        trainer.model.train()
        start_epoch(loader, epoch)  # seeded orders and augmentations: fresh and reproducible per epoch
        if resume is None:
            self.epoch_loss.reset()
            trainer.optimizer.zero_grad(set_to_none=True)
        self.position.start_epoch(first, fresh=resume is None)
        iterator = started(self._epoch_batches(loader, first))
        if resume is not None and "rng" in resume:
            from trainer.rng import set_rng_state

            # Again after iter(): a DataLoader draws its workers' base seed from the generator.
            set_rng_state(resume["rng"], self.trainer.device)
        return iterator

    def _epoch_batches(self, loader: Iterable, first: int) -> Iterable:
        """The batches left in this epoch after `first`: none when it is done or stopped, or when
        `loader` cannot start late (with a warning)."""
        from trainer.sampler import RESUMABLE_LOADERS, batches_from

        last = self.num_batches
        if self.should_stop or (last is not None and first >= last):
            return ()
        batches = batches_from(loader, first)  # started late only now, for this very pass
        if batches is None:
            warnings.warn(
                f"{type(loader).__name__} cannot start an epoch at a given batch, so this run resumes at the end "
                f"of epoch {self.epoch + 1}: the batches after batch {first} of it are skipped. {RESUMABLE_LOADERS}",
                RuntimeWarning,
                stacklevel=5,
            )
            return ()
        if self.trainer.limit_train_batches is not None and last is not None:  # a limit always gives a count
            return itertools.islice(batches, last - first)
        return batches

    # ----------------------------------------------------------------------------- one batch
    def _train_batch(self, batch_idx: int, batch: Any, val_loader: Iterable | None) -> bool:
        """Train on one batch; True when training stops after it (`should_stop`, one process)."""
        trainer = self.trainer
        self.batch_idx = batch_idx
        hooks, pos, accumulate, amp = (
            trainer._callbacks.table,
            self.position,
            trainer.accumulate_grad_batches,
            trainer._amp,
        )
        batch = trainer._move(batch)
        for fn in hooks["on_batch_start"]:
            fn(trainer, batch)
        with self._gradient_sync(batch_idx) if accumulate > 1 else _SYNCED:
            with amp.loop_autocast:
                out = trainer.train_step(batch)
            amp.backward(out.loss / accumulate if accumulate > 1 else out.loss)
        for fn in hooks["on_after_backward"]:
            fn(trainer)
        pos.pending += 1
        stepped = pos.pending == accumulate
        if stepped:
            self._optimizer_step()
        detached = out.loss.detach()
        self.epoch_loss.add(detached, batch_size(out.predictions if out.targets is None else out.targets))
        pos.batches_done = batch_idx + 1
        if stepped and trainer.val_every_n_steps is not None:
            self._maybe_validate_at_step(val_loader, last_batch=batch_idx + 1 == self.num_batches)
        if hooks["on_batch_end"]:
            outputs = StepOutput(detached, detach(out.predictions), out.targets)
            for fn in hooks["on_batch_end"]:
                fn(trainer, batch, outputs)
        if self.single and self.deadline is not None and time.monotonic() >= self.deadline:
            raise self._time_limit_reached()
        return self.should_stop and self.single

    def _gradient_sync(self, batch_idx: int) -> contextlib.AbstractContextManager:
        """Under DDP, `no_sync` for a micro-batch after which no optimizer step follows: its
        gradients add up on each rank and are all-reduced once, with those of the window's last
        micro-batch (forward and backward both inside, as DDP needs). The epoch's last batch
        always syncs, since the shorter last window steps at the epoch's end, as does every batch
        of a loader without a length (its last batch is not known in advance)."""
        model, last = self.trainer.model, self.num_batches
        steps_after = (
            self.position.pending + 1 >= self.trainer.accumulate_grad_batches or last is None or batch_idx + 1 >= last
        )
        if steps_after or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return model.no_sync()

    def _optimizer_step(self) -> None:
        trainer = self.trainer
        trainer._amp.step(trainer.optimizer, trainer.model.parameters, self._before_optimizer_step)
        self.position.pending = 0
        self.global_step += 1
        self.scheduling.after_optimizer_step()

    def _before_optimizer_step(self) -> None:
        trainer = self.trainer
        for fn in trainer._callbacks.table["on_before_optimizer_step"]:
            fn(trainer, trainer.optimizer)

    # ----------------------------------------------------------------------------- epoch end
    def _end_epoch(self, val_loader: Iterable | None) -> dict[str, float]:
        """Step on a last, shorter accumulation window, validate, step the scheduler, record the
        epoch's logs and fire ``on_epoch_end``."""
        trainer, pos = self.trainer, self.position
        if pos.pending:
            if pos.pending != trainer.accumulate_grad_batches:  # a shorter last window: its own mean
                for param in trainer.model.parameters():
                    if param.grad is not None:
                        param.grad.mul_(trainer.accumulate_grad_batches / pos.pending)
            self._optimizer_step()
            if trainer.val_every_n_steps is not None:
                self._maybe_validate_at_step(val_loader, last_batch=True)
        where = f"in epoch {self.epoch + 1}/{self.max_epochs} (by global step {self.global_step})"
        logs = {"loss": self.epoch_loss.mean(self.single, where)}
        if val_loader is not None and trainer.val_at_epoch_end and pos.validated_at != self.global_step:
            from trainer.rng import rng_state

            pos.epoch_end_rng = rng_state(trainer.device)  # a stop during the validation saves this one
            logs.update(self._validate(val_loader))
            self.scheduling.after_validation(logs)
        pos.epoch_end_rng = None
        self.scheduling.at_epoch_end(logs)
        logs["lr"] = trainer.optimizer.param_groups[0]["lr"]
        self.history.append(logs)
        pos.end_epoch()
        trainer._callbacks.fire("on_epoch_end", logs)
        self.resources.flush()
        return logs

    def _stop_after_epoch(self, epoch: int) -> bool:
        """Whether training stops after `epoch`; under torchrun every rank agrees (a time limit
        passed on any rank raises `TimeLimitReached` on all)."""
        over = self.deadline is not None and time.monotonic() >= self.deadline
        if not self.single:
            from trainer.distributed import all_reduce

            flags = torch.tensor([float(self.should_stop), float(over)], device=self.trainer.device)
            stop, over = (bool(flag) for flag in all_reduce(flags, "max").tolist())
            self.should_stop = stop
            if over and not stop and epoch + 1 < self.max_epochs:
                raise self._time_limit_reached()
        return self.should_stop

    def _time_limit_reached(self) -> TimeLimitReached:
        from trainer.durations import format_duration
        from trainer.errors import TimeLimitReached

        where = f"batch {self.batch_idx + 1}" + (f" of {self.num_batches}" if self.num_batches else "")
        max_time = self.trainer.max_time
        assert max_time is not None  # only a fit with a time limit has a deadline
        return TimeLimitReached(
            f"time limit {format_duration(max_time)} reached after global step "
            f"{self.global_step} (epoch {self.epoch + 1}, {where})"
        )

    # ----------------------------------------------------------------------------- validation
    def _maybe_validate_at_step(self, val_loader: Iterable | None, last_batch: bool) -> None:
        """After an optimizer step: validate if the global step is a multiple of
        `val_every_n_steps`, unless the epoch-end validation follows at once (`last_batch`)."""
        every = self.trainer.val_every_n_steps
        if (
            val_loader is not None
            and every is not None
            and self.global_step % every == 0
            and not (last_batch and self.trainer.val_at_epoch_end)
        ):
            self.in_step_validation = True
            try:
                logs = self._validate(val_loader)
            finally:
                self.in_step_validation = False
            self.position.validated_at = self.global_step
            self.scheduling.after_validation(logs)

    def _validate(self, loader: Iterable) -> dict[str, float]:
        from trainer.distributed import all_reduce, broadcast_buffers

        trainer = self.trainer
        # The unwrapped model: evaluation needs no communication, so ranks may hold uneven shards.
        broadcast_buffers(trainer.module)
        trainer._callbacks.fire("on_validation_start")
        batches = loaded(self._validation_batches(loader), lambda index: f"validation batch {index + 1}")
        try:
            sums = self._validation_sums(batches)
        finally:
            batches.close()
        # One device sync (and under torchrun one reduction) for all values of the validation, and
        # the training loss of the epoch so far: a non-finite one is raised on every rank alike here.
        *values, training, samples = all_reduce(sums).tolist()
        if not math.isfinite(training):
            raise non_finite_loss(
                training, f"by global step {self.global_step} (epoch {self.epoch + 1}/{self.max_epochs})"
            )
        if samples == 0:
            raise ValueError("the validation loader yielded no batches")
        logs = {"val_loss": values[0] / samples}
        logs.update({f"val_{name}": v / samples for name, v in zip(trainer.metrics, values[1:])})
        trainer._callbacks.fire("on_validation_end", logs)
        return logs

    def _validation_batches(self, loader: Iterable) -> Iterable:
        limit = self.trainer.limit_val_batches
        if limit is None:
            return loader
        return itertools.islice(loader, batches_taken(loader, limit, "limit_val_batches"))

    def _validation_sums(self, loader: Iterable) -> torch.Tensor:
        """The loss and metric sums (weighted by batch size) over `loader`, the training loss sum
        of the epoch so far (0 outside a fit) and the samples, in one tensor."""
        trainer = self.trainer
        metrics = trainer.metrics
        sums = torch.zeros(len(metrics) + 3, device=trainer.device)
        if self.fitting:
            sums[-2] = self.epoch_loss.total
        batch_end = trainer._callbacks.table["on_validation_batch_end"]
        samples = 0
        with trainer.eval_mode():
            for batch in started(loader):
                batch = trainer._move(batch)
                out = trainer.eval_step(batch)
                n = batch_size(out.predictions if out.targets is None else out.targets)
                sums[0].add_(out.loss.detach().float(), alpha=n)
                if metrics:
                    if out.targets is None:
                        raise ValueError("metrics need targets, but eval_step returned StepOutput.targets=None")
                    final = last_output(out.predictions)
                    for index, fn in enumerate(metrics.values(), start=1):
                        sums[index].add_(fn(final, out.targets).detach().float(), alpha=n)
                samples += n
                for fn in batch_end:
                    fn(trainer, batch, out)
        sums[-1] = samples
        return sums


_SYNCED = contextlib.nullcontext()  # a batch that an optimizer step always follows: nothing to enter


def _training_batch(epoch: int) -> Callable[[int], str]:
    """Names the training batches of `epoch` (0-based) for `trainer.batch.loaded`."""
    return lambda index: f"training batch {index + 1} of epoch {epoch + 1}"
