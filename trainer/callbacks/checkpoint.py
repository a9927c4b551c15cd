"""`ModelCheckpoint`: the last and the best training states, written atomically."""

from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path
from typing import Any

from trainer.callback import Callback
from trainer.callbacks.monitor import check_mode, check_monitor, decides_at_validations, improves, worst
from trainer.checkpoint import atomic_save
from trainer.distributed import is_rank_zero
from trainer.errors import NonFiniteLossError, TrainingInterrupted
from trainer.every import Every
from trainer.model_spec import is_plain, record_model
from trainer.options import positive_int
from trainer.sampler import RESUMABLE_LOADERS, resumable
from trainer.trained_model import describe, weights_only

#: The file name of the last training state in a `ModelCheckpoint`'s folder: what a run resumes from.
CHECKPOINT_LAST = "last.pt"
#: The file name of the best training state by the monitored value: what ``predict`` reads.
CHECKPOINT_BEST = "best.pt"


class ModelCheckpoint(Callback):
    """Save the whole training state every epoch (``last.pt``) and whenever `monitor` improves
    (``best.pt``), atomically, so a crash never leaves a broken file.

    A checkpoint holds `Trainer.state_dict()` (model, optimizer, scheduler, grad scaler, epochs
    done, global step, history, random generators, callback states, and the position inside the
    epoch for one taken there) and describes itself: its format version, the model's class and
    constructor arguments (``model_spec``, recorded when the fit starts, before any training: a
    model whose arguments cannot be read raises `trainer.model_spec.ModelSpecError` there, naming
    the class and the argument; pass `model_args` then), `data` and `config`, e.g. the recipe's
    options (keys: `trainer.trained_model`). Continue a run with
    ``trainer.fit(..., resume_from=checkpoint.last_path)``; rebuild the trained model with
    ``trainer.load_model(checkpoint.best_path)``.

    - `every_n_steps`: also write ``last.pt`` every N optimizer steps, holding the position
      inside the epoch: a resumed run continues at the next batch (not on an epoch's last batch,
      whose end-of-epoch checkpoint follows at once).
    - `save_top_k`: also keep the K best states by `monitor` as
      ``epoch=E-step=S-<monitor>=<value>.pt``; a file that drops out of the K is deleted.
    - With `Trainer(val_every_n_steps=...)` and a validation value as `monitor`, ``best.pt`` and
      the top K are decided after each validation, and saved at the end of that batch.
    - When training is interrupted to be resumed (`TrainingInterrupted`: a signal in the
      recipes, `Trainer(max_time=...)`), ``last.pt`` is written at the position reached, if the
      training loader can start inside an epoch (`trainer.sampler.resumable`) or `every_n_steps`
      is set.

    It runs after the other callbacks (``order = 100``), so the state it saves includes what they
    did (an early stop, the logs, their own states), and it flushes the run's shared resources
    (the TensorBoard writer) before saving: a checkpoint is never ahead of the logs. Under
    torchrun it runs on every rank, which decide alike when to save, so that a checkpoint taken
    inside an epoch holds every rank's loss sums (`Trainer.gather_position`); rank 0 writes the
    files. A checkpoint saved at an interruption holds rank 0's sums only (the ranks may stop at
    different steps), so a run resumed from it logs an estimate of that epoch's training loss.

    Args:
        dirpath: the folder of ``last.pt``, ``best.pt`` and the top K (created on first save).
        monitor: the logs value that ranks states (``val_loss``, ``val_iou``...); None keeps
            ``last.pt`` only.
        mode: ``"min"`` or ``"max"``: whether a lower or a higher `monitor` is better.
        save_last: write ``last.pt`` (needed to resume); False keeps only the best states.
        config: saved in every checkpoint under ``"config"`` (e.g. the recipe's options).
        every_n_steps: also write ``last.pt`` every N optimizer steps, inside epochs.
        save_top_k: also keep the K best states by `monitor`, each in its own file.
        model_args: the keyword arguments that rebuild the model, ``type(model)(**model_args)``,
            for a model whose arguments cannot be read from the instance (see `trainer.model_spec`).
        data: the data's sizing and class names, saved under ``"data"`` (e.g. ``{"classes": [...],
            "image_size": 96, "input_channels": 3, "mask_type": "labels"}``), which `predict`
            reads: it refuses a file without ``mask_type`` (``"labels"``: a softmax and one label
            map; ``"binary"``: a sigmoid and a mask per class).
        best_weights_only: ``best.pt`` and the top K hold the weights and the description only
            (`trainer.trained_model.MODEL_KEYS`), for deployment: a third of the size with Adam;
            they cannot resume a run (``last.pt`` still can).
        describe_model: record the model's ``model_spec``; False saves checkpoints without it,
            for a model that cannot be rebuilt from plain arguments (they resume a run, but
            `trainer.load_model` refuses them).
    """

    rank_zero_only = False  # every rank gathers the position's loss sums; rank 0 writes
    order = 100

    def __init__(
        self,
        dirpath: str | os.PathLike,
        monitor: str | None = "val_loss",
        mode: str = "min",
        save_last: bool = True,
        config: dict[str, Any] | None = None,
        every_n_steps: int | None = None,
        save_top_k: int | None = None,
        model_args: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
        best_weights_only: bool = False,
        describe_model: bool = True,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.monitor, self.mode = monitor, check_mode(mode)
        self.save_last, self.config = save_last, dict(config or {})
        self.every_n_steps = every_n_steps
        self._step_point = Every(every_n_steps, "every_n_steps")
        self.save_top_k = positive_int("save_top_k", save_top_k, optional=True)
        if save_top_k is not None and monitor is None:
            raise ValueError("save_top_k needs a monitor to rank checkpoints by")
        self.best = worst(mode)
        self.best_epoch: int | None = None
        self.best_step: int | None = None
        #: The kept states, best first: ``[value, file name]`` pairs.
        self.top_k: list[list[Any]] = []
        self._validation: float | None = None  # a step validation's value, saved at its batch's end
        self._saved_at: tuple[int, int, int] | None = None
        given = data or {}
        bad = [key for key, value in given.items() if not (isinstance(key, str) and is_plain(value))]
        if bad:
            raise ValueError(
                f"ModelCheckpoint(data=...): {bad[0]!r} holds a {type(given[bad[0]]).__name__}; data "
                "holds numbers, strings, bools, None, and lists or dicts of them"
            )
        self.model_args, self.data, self.best_weights_only = model_args, dict(data or {}), best_weights_only
        self.describe_model = describe_model
        self._model_spec: dict[str, Any] | None = None

    @property
    def last_path(self) -> Path:
        """Where the latest state is written."""
        return self.dirpath / CHECKPOINT_LAST

    @property
    def best_path(self) -> Path:
        """Where the state of the best epoch (or validation) by `monitor` is written."""
        return self.dirpath / CHECKPOINT_BEST

    def top_k_paths(self) -> list[Path]:
        """The files of the `save_top_k` best states, best first."""
        return [self.dirpath / name for _, name in self.top_k]

    def on_fit_start(self, trainer) -> None:
        if self.describe_model:  # an unrecordable model fails here, before any training
            self._model_spec = record_model(trainer.module, self.model_args)
        self._validation = None
        self._step_point.start(trainer.global_step)
        if not is_rank_zero():
            return
        if self.every_n_steps is not None and not resumable(trainer.train_loader):
            warnings.warn(
                f"ModelCheckpoint(every_n_steps={self.every_n_steps}): {type(trainer.train_loader).__name__} cannot "
                f"start an epoch at a given batch, so a run resumed from a step checkpoint continues at the end of "
                f"that epoch, skipping the batches it had not trained. {RESUMABLE_LOADERS}",
                RuntimeWarning,
                stacklevel=2,
            )
        if self.save_top_k is not None and self.monitor is not None and trainer.start_step > 0:
            # Written by an interrupted process after the checkpoint it resumes from: redone anyway.
            kept = {name for _, name in self.top_k}
            for path in self.dirpath.glob(f"epoch=*-step=*-{glob.escape(self.monitor)}=*.pt"):
                if path.name not in kept:
                    path.unlink(missing_ok=True)

    def idle_hooks(self, trainer) -> frozenset[str]:
        """Without step checkpoints and step validations it saves at epoch ends only."""
        if self.every_n_steps is None and not (
            self.monitor is not None and decides_at_validations(trainer, self.monitor)
        ):
            return frozenset({"on_batch_end", "on_validation_end"})
        return frozenset()

    def on_validation_end(self, trainer, logs) -> None:
        if trainer.in_step_validation and self.monitor is not None and self.monitor.startswith("val_"):
            self._validation = check_monitor("ModelCheckpoint", self.monitor, logs)

    def on_batch_end(self, trainer, batch, outputs) -> None:
        value, self._validation = self._validation, None
        due = self._step_point(trainer.global_step) and trainer.batch_idx + 1 != trainer.num_batches
        if value is not None or due:
            self._save(trainer, value, last=due and self.save_last)

    def on_epoch_end(self, trainer, logs) -> None:
        value = None
        if self.monitor is not None and (self.monitor in logs or not decides_at_validations(trainer, self.monitor)):
            value = check_monitor("ModelCheckpoint", self.monitor, logs)
        self._save(trainer, value, last=self.save_last)

    def _save(self, trainer, value: float | None, last: bool, every_rank: bool = True) -> None:
        """Write what is due (on rank 0). With `every_rank`, every rank calls it at the same point
        and the loss sums of every rank are gathered for the position saved."""
        improved = False
        if value is not None and improves(value, self.best, self.mode):
            improved = True
            self.best, self.best_epoch, self.best_step = value, trainer.epoch, trainer.global_step
        entry, dropped = self._rank(trainer, value)
        if not (improved or last or entry):
            return
        if every_rank:
            trainer.gather_position()
        if not is_rank_zero():
            return
        trainer.resources.flush()
        state = {**trainer.state_dict(), **describe(self._model_spec, self.data, self.config)}
        best = weights_only(state) if self.best_weights_only else state
        # The top K and best.pt before last.pt: a crash between them resumes from the previous
        # last.pt, redoes this epoch and rewrites them, instead of continuing with files that miss it.
        if entry:
            atomic_save(best, self.dirpath / entry)
        if improved:
            atomic_save(best, self.best_path)
        if last:
            atomic_save(state, self.last_path)
            self._saved_at = self._position(trainer)
        for name in dropped:  # once the state that no longer lists them is saved
            (self.dirpath / name).unlink(missing_ok=True)

    def _rank(self, trainer, value: float | None) -> tuple[str | None, list[str]]:
        """The file name of a new top-K state (None when `value` is not among the K best) and the
        names that drop out of the K."""
        if self.save_top_k is None or value is None:
            return None, []
        name = f"epoch={trainer.epoch + 1}-step={trainer.global_step}-{self.monitor}={value:.4f}.pt"
        ranked = sorted([*self.top_k, [value, name]], key=lambda e: e[0], reverse=self.mode == "max")  # stable
        self.top_k, dropped = ranked[: self.save_top_k], [e[1] for e in ranked[self.save_top_k :]]
        if name in dropped:
            return None, []
        return name, dropped

    @staticmethod
    def _position(trainer) -> tuple[int, int, int]:
        return trainer.global_step, len(trainer.history), trainer.batch_idx

    def on_exception(self, trainer, exception) -> None:
        if isinstance(exception, NonFiniteLossError):
            saved = self.last_path if self.last_path.is_file() else None
            exception.add_note(f"last good checkpoint: {saved}" if saved else "no checkpoint was written yet")
        elif (
            isinstance(exception, TrainingInterrupted)
            and self.save_last
            and (self.every_n_steps is not None or resumable(trainer.train_loader))
        ):
            if self._saved_at != self._position(trainer):
                # No gathering: under torchrun the ranks need not be at the same step here.
                self._save(trainer, None, last=True, every_rank=False)
            if is_rank_zero():
                exception.add_note(
                    f"saved {self.last_path}: continue with fit(..., resume_from={str(self.last_path)!r})"
                )

    def state_dict(self) -> dict[str, Any]:
        """The best value so far, its epoch and step, and the top K kept."""
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "best_step": self.best_step,
            "top_k": [list(entry) for entry in self.top_k],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.best_step = state.get("best_step")
        self.top_k = [list(entry) for entry in state.get("top_k", [])]
