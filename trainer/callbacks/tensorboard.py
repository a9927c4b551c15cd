"""TensorBoard logging: the run's one shared writer, and `TensorBoardCallback`.

Every TensorBoard callback of a run names the same `log_dir`; they all write through one
`SummaryWriter` (one event stream per run), kept in the trainer's `FitResources` for the length
of the fit: opened on first use, flushed at every epoch end and before every checkpoint, closed
when `fit` ends, also after an exception. Subclasses of `TensorBoardWriterCallback` just use
``self.writer`` in any hook; no ``super()`` calls are needed.
"""

from __future__ import annotations

import glob
import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from trainer.batch import head, move_to_device, peek_batch
from trainer.callback import Callback
from trainer.callbacks import tags as scheme
from trainer.callbacks.hparams import MAIN_HPARAMS, hparams_summaries
from trainer.callbacks.monitor import check_mode
from trainer.distributed import get_world_size, is_rank_zero
from trainer.event_files import EVENT_FILE_PATTERN
from trainer.every import Every
from trainer.options import renamed_option
from trainer.pinning import every_cpu
from trainer.running import RunningLoss


def has_event_files(path: str | os.PathLike, recursive: bool = False) -> bool:
    """Whether `path` (or, `recursive`, a folder below it) holds TensorBoard event files."""
    pattern = os.path.join(glob.escape(os.fspath(path)), "**" if recursive else "", EVENT_FILE_PATTERN)
    return bool(glob.glob(pattern, recursive=recursive))


def _quiet_writer_thread_errors(args: threading.ExceptHookArgs) -> None:
    """`threading.excepthook` that leaves out the traceback of a TensorBoard writer thread's
    `OSError`: the writer raises that error again at its next call in the fit's own thread."""
    if type(args.thread).__module__.startswith("tensorboard.") and isinstance(args.exc_value, OSError):
        return
    _previous_excepthook(args)


_previous_excepthook = threading.excepthook


def open_writer(log_dir: str | os.PathLike, purge_step: int | None = None) -> SummaryWriter:
    """A `SummaryWriter` on `log_dir`, created if needed, with a clear error when it cannot be.

    `purge_step` (used when a run resumes) drops events at or after that step that a previous,
    interrupted process wrote.

    A failed write of the event file (a full disk) happens in the writer's own thread; that
    thread ends, and the writer's next call (``add_*``, ``flush``, ``close``) raises its
    `OSError` (errno 28 for a full disk) in the caller's thread. The thread's own traceback is
    not printed. The event file keeps every record written before; its last one may be cut
    short, which TensorBoard's readers skip, and a resumed run purges from its checkpoint's step.
    """
    global _previous_excepthook
    if threading.excepthook is not _quiet_writer_thread_errors:
        _previous_excepthook, threading.excepthook = threading.excepthook, _quiet_writer_thread_errors
    try:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create the TensorBoard log directory {os.fspath(log_dir)!r}: {exc}") from exc
    if not os.access(log_dir, os.W_OK):
        raise PermissionError(f"the TensorBoard log directory {os.fspath(log_dir)!r} is not writable")
    return _writer_read_last(os.fspath(log_dir), purge_step)


def _writer_read_last(log_dir: str, purge_step: int | None) -> SummaryWriter:
    """A `SummaryWriter` on `log_dir` whose event file TensorBoard reads after the ones there.

    TensorBoard reads a folder's event files in the order of their names,
    ``events.out.tfevents.<second>.<host>.<pid>.<counter>``. Two files named in the same second
    compare by process id and counter as text (``.10`` before ``.9``): a resumed run's file would be
    read before the interrupted run's, and its restart marker would drop nothing. Such a file (made
    within a second of the previous writer's) is removed at once and made again in the next second.
    """
    before = set(glob.glob(os.path.join(glob.escape(log_dir), EVENT_FILE_PATTERN)))
    with every_cpu():  # the writer's thread starts here: not on the one CPU a fit keeps its thread on
        writer = SummaryWriter(log_dir, purge_step=purge_step)
    made = set(glob.glob(os.path.join(glob.escape(log_dir), EVENT_FILE_PATTERN))) - before
    if not before or not made or min(made) > max(before):
        return writer
    newest = max(_named_second(path) for path in before)
    if newest > time.time():  # named by a clock ahead of this one: no wait would help
        return writer
    writer.close()
    for path in made:
        os.unlink(path)
    while (now := time.time()) < newest + 1:
        time.sleep(newest + 1 - now)
    return SummaryWriter(log_dir, purge_step=purge_step)


def _named_second(path: str) -> int:
    """The second in an event file's name (0 for a name without one)."""
    match = re.match(r"events\.out\.tfevents\.(\d+)\.", os.path.basename(path))
    return int(match.group(1)) if match else 0


#: The folders a fit started in a run directory that already holds a run writes to (``version_1``...).
VERSION_PREFIX = "version_"


def holds_run(path: str | os.PathLike) -> bool:
    """Whether the event files in `path` hold a run: at least one scalar point. A run stopped before
    its first log point (only its graph, images or hparams written) does not count: a new fit
    replaces it."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    for file in sorted(glob.glob(os.path.join(glob.escape(os.fspath(path)), EVENT_FILE_PATTERN))):
        for event in EventFileLoader(file).Load():
            if any(
                value.HasField("simple_value") or value.metadata.plugin_data.plugin_name == "scalars"
                for value in event.summary.value
            ):
                return True
    return False


def run_versions(log_dir: str | os.PathLike) -> list[Path]:
    """The runs logged in `log_dir` (see `holds_run`), oldest first: `log_dir` itself, then its
    ``version_N`` folders, by N."""
    root = Path(log_dir)
    numbered = []
    for child in root.glob(f"{VERSION_PREFIX}*"):
        number = child.name[len(VERSION_PREFIX) :]
        if number.isdigit() and holds_run(child):
            numbered.append((int(number), child))
    return ([root] if holds_run(root) else []) + [child for _, child in sorted(numbered)]


def writer_dir(log_dir: str | os.PathLike, resumed: bool) -> Path:
    """Where a fit logs in the run directory `log_dir`, so that two fits never share a curve.

    A resumed fit continues the newest run there (`run_versions`). A new fit writes in `log_dir`
    if it holds no run yet (replacing what a run stopped before its first log point wrote there), else
    in a new sibling ``log_dir/version_N`` (N one above the highest
    there; the run in `log_dir` itself counts as version 0), as PyTorch Lightning numbers runs.
    """
    versions = run_versions(log_dir)
    if resumed:
        return versions[-1] if versions else Path(log_dir)
    if not versions:
        return Path(log_dir)
    numbers = [
        int(p.name[len(VERSION_PREFIX) :])
        for p in Path(log_dir).glob(f"{VERSION_PREFIX}*")
        if p.name[len(VERSION_PREFIX) :].isdigit()
    ]
    return Path(log_dir) / f"{VERSION_PREFIX}{max(numbers, default=0) + 1}"


class TensorBoardWriterCallback(Callback):
    """Base of the TensorBoard callbacks: ``self.writer`` is the run's shared `SummaryWriter`.

    Use ``self.writer`` in any hook during a fit; the trainer opens, flushes and closes it (see
    the module docstring). It is None on the ranks other than 0 under torchrun (a subclass that
    sets ``rank_zero_only = False`` to compute on every rank writes only on rank 0).

    ``self.resumed`` says whether the fit continues a run (it started past step 0). Every stream
    starts with a restart marker (TensorBoard's ``SessionLog.START``) at its first step. A resumed
    run's marker is at ``global_step + 1``: points that the interrupted process wrote after its
    last checkpoint are dropped, so curves continue without duplicated or orphaned steps.
    TensorBoard's Python loader (the one `trainer.board` runs) takes a run's first marker for its
    start and only later ones for restarts, so the new run's marker is what makes it drop them.

    A new fit (from step 0) in a directory that already holds a run never mixes with it: it logs
    to a sibling folder, ``log_dir/version_1`` (then ``version_2``...; see `writer_dir`), and
    says so in one line; a resumed fit continues the newest of them.

    Args:
        log_dir: the run directory, shared with the run's other TensorBoard callbacks.
    """

    rank_zero_only = True

    def __init__(self, log_dir: str | os.PathLike) -> None:
        self.log_dir = os.fspath(log_dir)

    @property
    def resumed(self) -> bool:
        """Whether the current fit continues a run that had trained steps already."""
        return self.trainer is not None and self.trainer.start_step > 0

    @property
    def writer(self) -> SummaryWriter | None:
        """The run's shared writer for the current fit (None on ranks other than 0)."""
        trainer = self.trainer
        if trainer is None:
            raise RuntimeError(f"{type(self).__name__}.writer is there during a fit only")
        if not is_rank_zero():
            return None

        def create() -> SummaryWriter:
            where = writer_dir(self.log_dir, self.resumed)
            if not self.resumed and where != Path(self.log_dir):
                print(
                    f"TensorBoard: {self.log_dir} already holds a run, so this one logs to {os.fspath(where)} "
                    "(to continue a run instead, fit with resume_from=)"
                )
            # The start marker at the fit's first step (see the class docstring).
            return open_writer(where, trainer.start_step + 1 if self.resumed else 0)

        return trainer.resources.get(("SummaryWriter", os.path.realpath(self.log_dir)), create)

    def _rank_zero_writer(self) -> SummaryWriter:
        """`writer` in a hook that runs on rank 0 only (``rank_zero_only``), where it is there."""
        writer = self.writer
        if writer is None:
            raise RuntimeError(f"{type(self).__name__} writes on rank 0 only")
        return writer


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


def stretch_contrast(images: torch.Tensor, low: float = 0.01, high: float = 0.99) -> torch.Tensor:
    """Per image, stretch (N, C, H, W) images in [0, 1] so that their `low` and `high` quantiles
    (over all channels, so colours keep their balance) become 0 and 1: dim images become visible.
    An image of one flat value is left as it is."""
    flat = images.flatten(1).float()
    if flat.shape[1] > 1 << 20:  # torch.quantile has a size limit; a strided sample estimates it well
        flat = flat[:, :: flat.shape[1] // (1 << 20) + 1]
    bounds = torch.quantile(flat, torch.tensor([low, high], dtype=flat.dtype), dim=1)
    lo, hi = (bound.view(-1, *[1] * (images.dim() - 1)) for bound in bounds)
    span = hi - lo
    stretched = ((images - lo) / span.clamp(min=1e-6)).clamp(0.0, 1.0)
    return torch.where(span > 1e-6, stretched, images)


class TensorBoardCallback(TensorBoardWriterCallback):
    """Scalars for TensorBoard: running training loss, throughput, per-epoch logs and the run's
    hparams, under the tags of `trainer.callbacks.tags` (docs/tensorboard.md, "TensorBoard tags").

    - Every `every_n_steps` optimizer steps: the mean training loss since the previous point,
      under `running_loss_tag` (``Loss/training loss``; x axis: global step), and the training
      samples per second of wall time since the previous point (of all processes under
      torchrun), under `throughput_tag`; with a scheduler stepped per step
      (``scheduler_interval="step"``), the learning rate too, so its warm-up shows. Nothing is
      done between log points; the throughput needs no device sync.
    - Every epoch end: each value of the epoch's logs at the global step, so one x axis serves
      all curves: ``loss`` as ``Loss/training (epoch mean)``, ``val_loss`` as
      ``Loss/validation``, ``val_<metric>`` as ``Validation/<metric>``, ``lr`` as
      ``learning rate``; a metric ``<metric>_<class>`` beside ``<metric>`` (one class's value)
      under the parent's tag and ``/<class>`` (``Validation/iou/nucleus``, see
      `trainer.callbacks.tags.parent_metric`); `tags` renames any of them
      (``{"val_iou": "Validation/IoU"}``, which also gives ``Validation/IoU/<class>``). After
      each step validation (`Trainer(val_every_n_steps=...)`) its values, under the same tags.
      A "Custom Scalars" chart overlays the running, epoch and validation losses.
    - At the start of a new run (not of a resumed one): `hparams` (or, by default, learning
      rate, epochs, batch size, optimizer, precision and scheduler) for the HParams tab, with the
      options named in `main_hparams` first, and as its metrics the epoch curves, whose last
      values TensorBoard shows: `monitor`'s first, then the validation loss and metrics, then
      the training loss. A run holds this one entry across resumes (TensorBoard would show only
      the first anyway; a run resumed with more epochs keeps showing the epochs it started
      with). Nothing of it is written as a scalar: the Time Series tab holds curves only.

    Args:
        log_dir: the run directory (shared with the run's other TensorBoard callbacks).
        every_n_steps: optimizer steps between running-loss points.
        running_loss_tag: the tag of the running loss.
        tags: epoch log key -> tag, replacing the default of `trainer.callbacks.tags.epoch_tag`
            (and of the per-class values of a renamed metric).
        hparams: the run's options for the HParams tab (default: what the trainer knows).
        monitor, mode: the value the run is judged by (``"min"`` or ``"max"`` is better, as for
            `ModelCheckpoint`); its curve is the HParams tab's first metric.
        main_hparams: the options shown first, in this order (`hparams.MAIN_HPARAMS`).
        throughput_tag: the tag of the training throughput (``throughput (samples per second)``).
        log_every: the former name of `every_n_steps` (deprecated).
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        every_n_steps: int = 100,
        running_loss_tag: str = scheme.RUNNING_LOSS,
        tags: dict[str, str] | None = None,
        hparams: dict[str, Any] | None = None,
        monitor: str = "val_loss",
        mode: str = "min",
        main_hparams: Sequence[str] = MAIN_HPARAMS,
        throughput_tag: str = scheme.THROUGHPUT,
        *,
        log_every: int | None = None,
    ) -> None:
        super().__init__(log_dir)
        check_mode(mode)
        self.every_n_steps = renamed_option(
            "TensorBoardCallback", "log_every", log_every, "every_n_steps", every_n_steps
        )
        self._log_point = Every(self.every_n_steps, "every_n_steps")
        self.running_loss_tag = running_loss_tag
        self.throughput_tag = throughput_tag
        self._clock = (0.0, 0)  # wall time and samples trained at the last point (or the fit's start)
        self._rate_logged_at = -1  # the global step of the last learning-rate point
        self.tags = dict(tags or {})
        self.hparams = hparams
        self.monitor, self.mode = monitor, mode
        self.main_hparams = tuple(main_hparams)
        self._running = RunningLoss()

    def tag(self, key: str, keys: Iterable[str] = ()) -> str:
        """The TensorBoard tag of an epoch log key.

        Args:
            key: the key (``val_iou``).
            keys: the keys logged with it, which tell one class's value (``val_iou_nucleus``
                beside ``val_iou``) from a metric of its own.
        """
        if key in self.tags:
            return self.tags[key]
        parent = scheme.parent_metric(key, keys)
        if parent is not None:
            return f"{self.tag(parent, keys)}/{key[len(parent) + 1 :]}"
        return scheme.epoch_tag(key)

    def on_fit_start(self, trainer) -> None:
        self._clock = (time.perf_counter(), trainer.epoch_loss.added)  # throughput counts from here
        self._log_point.start(trainer.global_step)
        if not self.resumed:
            losses = [self.running_loss_tag, self.tag("loss"), self.tag("val_loss")]
            self._rank_zero_writer().add_custom_scalars(
                {"losses": {"training and validation loss": ["Multiline", [f"^{re.escape(tag)}$" for tag in losses]]}}
            )
            self._write_hparams(trainer)

    def on_batch_end(self, trainer, batch, outputs) -> None:
        if self._log_point(trainer.global_step):
            loss = self._running.pop(trainer)
            if loss is not None:
                self._rank_zero_writer().add_scalar(self.running_loss_tag, loss, trainer.global_step)
            now, added = time.perf_counter(), trainer.epoch_loss.added
            if added > self._clock[1]:
                rate = (added - self._clock[1]) * get_world_size() / (now - self._clock[0])
                self._rank_zero_writer().add_scalar(self.throughput_tag, rate, trainer.global_step)
            self._clock = (now, added)
            if trainer.scheduler is not None and trainer.scheduler_interval == "step":
                lr = trainer.optimizer.param_groups[0]["lr"]
                self._rank_zero_writer().add_scalar(self.tag("lr"), lr, trainer.global_step)
                self._rate_logged_at = trainer.global_step

    def on_validation_end(self, trainer, logs) -> None:
        if trainer.in_step_validation:
            for key, value in logs.items():
                self._rank_zero_writer().add_scalar(self.tag(key, logs), value, trainer.global_step)

    def on_epoch_end(self, trainer, logs) -> None:
        for key, value in logs.items():
            if key == "lr" and self._rate_logged_at == trainer.global_step:
                continue  # the step's point holds it already
            self._rank_zero_writer().add_scalar(self.tag(key, logs), value, trainer.global_step)

    def metric_tags(self, keys: Sequence[str]) -> list[str]:
        """The HParams tab's metrics among the epoch log `keys`: `monitor`, the validation loss,
        the other validation metrics, then the training loss (the first five show by default)."""
        ordered = [self.monitor, "val_loss", *sorted(k for k in keys if k.startswith("val_")), "loss"]
        return [self.tag(key, keys) for key in dict.fromkeys(ordered) if key in keys]

    def state_dict(self) -> dict[str, Any]:
        """The running loss's state, so that a run resumed inside an epoch logs the same means."""
        return {"running": self._running.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self._running.load_state_dict(state["running"])

    def _write_hparams(self, trainer) -> None:
        # Once, when the run starts: TensorBoard keeps the first HParams entry a run's files hold
        # (later ones would be ignored), and takes each metric's value from its scalar curve, so
        # the HParams tab follows the run as it trains, and across resumes, with nothing more.
        hparams = self.hparams if self.hparams is not None else default_hparams(trainer)
        keys = ["loss"]
        if trainer.val_loader is not None:
            # Callbacks adding validation logs of their own (ConfusionMatrixCallback's val_iou) list them in log_keys.
            added = [key for callback in trainer.callbacks for key in getattr(callback, "log_keys", ())]
            keys += ["val_loss", *(f"val_{name}" for name in trainer.metrics), *added]
        summaries = hparams_summaries(hparams, self.metric_tags(keys), self.main_hparams)
        for summary in summaries:  # in this run's own stream (add_hparams would make a sub-run)
            self._rank_zero_writer().file_writer.add_summary(  # type: ignore[attr-defined]  # open during a fit
                summary, trainer.global_step
            )


def default_hparams(trainer) -> dict[str, Any]:
    """What the trainer knows of a run's hyperparameters."""
    group = trainer.optimizer.param_groups[0]
    hparams = {"lr": group.get("initial_lr", group["lr"]), "epochs": trainer.max_epochs}
    batch_size = getattr(trainer.train_loader, "batch_size", None)
    if isinstance(batch_size, int):
        hparams["batch_size"] = batch_size
    hparams.update(optimizer=type(trainer.optimizer).__name__, precision=trainer.precision)
    if trainer.scheduler is not None:
        hparams["scheduler"] = type(trainer.scheduler).__name__
    return hparams
