"""TensorBoard logging: one shared writer per run directory, and `TensorBoardCallback`.

Every TensorBoard callback of a run names the same `log_dir`; they all write through one
`SummaryWriter` (one event stream per run). The writer opens at the first callback's
``on_fit_start``, is flushed at every epoch end and closed by the last callback's
``on_fit_end``, also after an exception.
"""

from __future__ import annotations

import glob
import os
from numbers import Number
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from trainer.batch import head, move_to_device, peek_batch
from trainer.callback import Callback
from trainer.distributed import is_rank_zero
from trainer.callbacks.monitor import check_mode, check_monitor
from trainer.running import RunningLoss

_open_writers: dict[str, list] = {}  # real path -> [SummaryWriter, number of users]


def acquire_writer(log_dir: str | os.PathLike, purge_step: int | None = None) -> SummaryWriter:
    """The run's shared `SummaryWriter`, opened on first use; pair with `release_writer`.

    `purge_step` (used when a run resumes) drops events at or after that step that a previous,
    interrupted process wrote; it applies when the writer is opened.
    """
    key = os.path.realpath(log_dir)
    entry = _open_writers.get(key)
    if entry is None:
        try:
            Path(key).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(f"cannot create the TensorBoard log directory {str(log_dir)!r}: {exc}") from exc
        if not os.access(key, os.W_OK):
            raise PermissionError(f"the TensorBoard log directory {str(log_dir)!r} is not writable")
        entry = _open_writers[key] = [SummaryWriter(key, purge_step=purge_step), 0]
    entry[1] += 1
    return entry[0]


def release_writer(log_dir: str | os.PathLike) -> None:
    """Give back a writer from `acquire_writer`; the last user flushes and closes it."""
    key = os.path.realpath(log_dir)
    entry = _open_writers.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _open_writers[key]
        entry[0].close()


class TensorBoardWriterCallback(Callback):
    """Base of the TensorBoard callbacks: holds the run's shared writer during `fit`.

    Subclasses write with ``self.writer``. A resumed run (``trainer.global_step > 0`` at fit
    start; `resumed` is then True) opens the writer with ``purge_step=global_step + 1``: points
    that the interrupted process wrote after its last checkpoint are dropped, so curves continue
    without duplicated or orphaned steps. One-time writes (graph, first image grid, chart
    layout) are not repeated on resume. A fit starting at step 0 in a directory that already
    holds event files (a run restarted before its first checkpoint) purges from step 0.
    """

    rank_zero_only = True

    def __init__(self, log_dir: str | os.PathLike) -> None:
        self.log_dir = os.fspath(log_dir)
        self.writer: SummaryWriter | None = None
        self.resumed = False

    def on_fit_start(self, trainer) -> None:
        self.resumed = trainer.global_step > 0
        if not is_rank_zero():  # a subclass that runs on every rank (rank_zero_only = False) writes nothing there
            return
        if self.resumed:
            purge = trainer.global_step + 1
        else:  # a run that starts over in its directory replaces what an earlier attempt wrote
            purge = 0 if glob.glob(os.path.join(glob.escape(self.log_dir), "events.out.tfevents.*")) else None
        self.writer = acquire_writer(self.log_dir, purge_step=purge)

    def on_epoch_end(self, trainer, logs) -> None:
        if self.writer is not None:
            self.writer.flush()

    def on_fit_end(self, trainer) -> None:
        if self.writer is not None:
            self.writer = None
            release_writer(self.log_dir)


def take_batch(trainer, batch: Any, num: int | None = None) -> Any:
    """A fixed batch for visuals: `batch` if given, else the first validation batch (or first
    training batch), cut to its first `num` samples and kept on the CPU.

    Drawing from a loader does not disturb the random number generators, so a run with a fixed
    seed trains the same with or without visual callbacks.
    """
    if batch is None:
        batch = peek_batch(trainer.val_loader if trainer.val_loader is not None else trainer.train_loader)
    batch = move_to_device(batch, torch.device("cpu"))
    return batch if num is None else head(batch, num)


def denormalize(images: torch.Tensor, mean: Any = None, std: Any = None) -> torch.Tensor:
    """Undo ``(x - mean) / std`` per channel so images show as the user sees them, in [0, 1]."""
    images = images.detach().float().cpu()
    if std is not None:
        images = images * torch.as_tensor(std, dtype=images.dtype).reshape(-1, 1, 1)
    if mean is not None:
        images = images + torch.as_tensor(mean, dtype=images.dtype).reshape(-1, 1, 1)
    return images.clamp(0.0, 1.0)


class TensorBoardCallback(TensorBoardWriterCallback):
    """Scalars for TensorBoard: running training loss, per-epoch logs and the run's hparams.

    - Every `log_every` optimizer steps: the mean training loss since the previous point,
      under `running_loss_tag` (x axis: global step). Nothing is done between log points.
    - Every epoch end: each value of the epoch's logs (loss, val_loss, val_<metric>, lr)
      under ``tags.get(key, "epoch/<key>")``, at the global step, so one x axis serves all
      curves. A "Custom Scalars" chart overlays training and validation loss.
    - At the end of the last epoch (or of a `fit` stopped before it): `hparams` (or, by default,
      optimizer, learning rate, epochs and precision) with the final value of each logged key and
      the best `monitor` value, for the HParams tab.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        log_every: int = 100,
        running_loss_tag: str = "train/running_loss",
        tags: dict[str, str] | None = None,
        hparams: dict[str, Any] | None = None,
        monitor: str = "val_loss",
        mode: str = "min",
    ) -> None:
        super().__init__(log_dir)
        if not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f"log_every must be a positive integer, got {log_every!r}")
        check_mode(mode)
        self.log_every = log_every
        self.running_loss_tag = running_loss_tag
        self.tags = dict(tags or {})
        self.hparams = hparams
        self.monitor, self.mode = monitor, mode
        self._running = RunningLoss()
        self._last_logged_step = 0
        self._fit_start_step = 0
        self._hparams_step: int | None = None

    def tag(self, key: str) -> str:
        """The TensorBoard tag of an epoch log key."""
        return self.tags.get(key, f"epoch/{key}")

    def on_fit_start(self, trainer) -> None:
        super().on_fit_start(trainer)
        self._last_logged_step = self._fit_start_step = trainer.global_step
        self._hparams_step = None
        if not self.resumed:
            self.writer.add_custom_scalars(
                {"losses": {"training and validation loss": ["Multiline", [self.tag("loss"), self.tag("val_loss")]]}}
            )

    def on_batch_end(self, trainer, batch, outputs) -> None:
        step = trainer.global_step
        if step - self._last_logged_step >= self.log_every:
            self._last_logged_step = step
            loss = self._running.pop(trainer)
            if loss is not None:
                self.writer.add_scalar(self.running_loss_tag, loss, step)

    def on_epoch_end(self, trainer, logs) -> None:
        for key, value in logs.items():
            self.writer.add_scalar(self.tag(key), value, trainer.global_step)
        if trainer.epoch + 1 >= trainer.max_epochs or trainer.should_stop:
            # Before the last checkpoint (a ModelCheckpoint comes later in the list): a run killed
            # at any moment after it has them on disk once, and a resume neither repeats nor loses them.
            self._write_hparams(trainer)
        super().on_epoch_end(trainer, logs)

    def on_fit_end(self, trainer) -> None:
        # A fit stopped before its last epoch logs them now; a resumed fit that trained no step (the
        # run had already finished) logs nothing again.
        try:
            if (self.writer is not None and trainer.history and trainer.global_step > self._fit_start_step
                    and self._hparams_step != trainer.global_step):
                self._write_hparams(trainer)
        finally:
            super().on_fit_end(trainer)

    def _write_hparams(self, trainer) -> None:
        hparams = self.hparams if self.hparams is not None else default_hparams(trainer)
        final = trainer.history[-1]
        metrics = {f"hparams/final_{key}": value for key, value in final.items()}
        if self.monitor in final:
            pick = min if self.mode == "min" else max
            best = pick(check_monitor("TensorBoardCallback", self.monitor, logs) for logs in trainer.history)
            metrics[f"hparams/best_{self.monitor}"] = best
        experiment, start, end = hparams_summaries(_plain(hparams), metrics)
        file_writer = self.writer._get_file_writer()
        for summary in (experiment, start, end):
            file_writer.add_summary(summary, trainer.global_step)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, trainer.global_step)
        self._hparams_step = trainer.global_step


def default_hparams(trainer) -> dict[str, Any]:
    """What the trainer knows of a run's hyperparameters."""
    group = trainer.optimizer.param_groups[0]
    hparams = {
        "optimizer": type(trainer.optimizer).__name__,
        "lr": group.get("initial_lr", group["lr"]),
        "max_epochs": trainer.max_epochs,
        "precision": trainer.precision,
    }
    if trainer.scheduler is not None:
        hparams["scheduler"] = type(trainer.scheduler).__name__
    return hparams


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """HParams accept numbers, strings and booleans: show anything else as text."""
    return {key: value if isinstance(value, (Number, str, bool)) else str(value) for key, value in values.items()}
