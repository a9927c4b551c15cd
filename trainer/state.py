"""What a checkpoint holds to continue a run exactly: `CheckpointState` builds and restores it
(`Trainer.state_dict`, `load_state_dict`), `LoopPosition` is where the loop stands inside an epoch,
and the random generators' state (with `seed_everything`)."""

from __future__ import annotations

import dataclasses
import math
import random
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from trainer.core import Trainer


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
        cuda_rng: every rank's CUDA generator state, and the ``(global_step, epochs done,
            batches_done)`` they were gathered at (see `CheckpointState.gather_position`).
    """

    batches_done: int | None = None
    pending: int = 0
    validated_at: int | None = None
    resume: dict[str, Any] | None = None
    epoch_end_rng: dict[str, Any] | None = None
    cuda_rng: tuple[tuple[int, int, int | None], list[torch.Tensor]] | None = None

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

    def take_resume(self, epoch: int) -> dict[str, Any] | None:
        """The resume point if it is inside `epoch` (then forgotten), else None."""
        resume, self.resume = (self.resume if self.resume and self.resume["epoch"] == epoch else None), None
        return resume


class CheckpointState:
    """The checkpoint state of one trainer: its parts' states (model, optimizer, scheduler, grad
    scaler, callbacks) and its loop's progress and position. It owns every rank's loss sums that
    `gather_position` collected for the next `state_dict`.

    Args:
        trainer: the trainer whose state this is.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        #: Every rank's (loss sum, samples) of the epoch so far, and the ``(epoch, batches_done)``
        #: they were gathered at (see `gather_position`).
        self.gathered: tuple[tuple[int, int], list[tuple[torch.Tensor, int]]] | None = None

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
        trainer, loop = self.trainer, self.trainer._loop
        scaler = trainer._amp.scaler
        return {
            "model": trainer.module.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epochs_done": len(loop.history),
            "max_epochs": trainer.max_epochs,
            "should_stop": loop.should_stop,
            "global_step": loop.global_step,
            "history": [dict(logs) for logs in loop.history],
            "rng": self._rng_to_save(),
            "precision": {
                "precision": trainer.precision,
                "channels_last": trainer.channels_last,
                "onednn": trainer.onednn,
                "device": trainer.device.type,
            },
            "callbacks": trainer._callbacks.state_dict(),
            "position": self._position_state(),
        }

    def gather_position(self) -> None:
        """Under torchrun, collect every rank's CUDA generator state and, inside an epoch, every
        rank's training loss sums of the epoch so far, so that a `state_dict` taken next at this
        position (on rank 0) holds them all: a run resumed from it gives each rank its own CUDA
        generator back and logs that epoch's loss exactly. Every rank must call it at the same
        point of the loop; in a single process it does nothing."""
        from trainer.distributed import all_gather, is_distributed
        from trainer.running import non_finite_loss

        if not is_distributed():
            return
        self._gather_cuda_rng()
        loop = self.trainer._loop
        batches_done = loop.position.batches_done
        if batches_done is None:  # outside an epoch
            return
        loss = loop.epoch_loss
        local = torch.stack(
            [
                loss.total.detach().to(torch.float64),
                torch.tensor(float(loss.samples), dtype=torch.float64, device=self.trainer.device),
            ]
        )
        ranks = [(sums[0].to(loss.total.dtype), int(sums[1].item())) for sums in all_gather(local)]
        total = sum(float(sums) for sums, _ in ranks)  # every rank's: all raise a non-finite loss alike
        if not math.isfinite(total):
            where = f"by global step {loop.global_step} (epoch {loop.epoch + 1}/{self.trainer.max_epochs})"
            raise non_finite_loss(total, where)
        self.gathered = ((loop.epoch, batches_done), ranks)

    def _rng_now(self) -> dict[str, Any]:
        """The generator states a checkpoint taken now holds: before the epoch-end validation, which
        a resumed run does again, those from before it."""
        pos = self.trainer._loop.position
        return pos.epoch_end_rng if pos.epoch_end_rng is not None else rng_state(self.trainer.device)

    def _rng_point(self) -> tuple[int, int, int | None]:
        loop = self.trainer._loop
        return loop.global_step, len(loop.history), loop.position.batches_done

    def _gather_cuda_rng(self) -> None:
        from trainer.distributed import all_gather

        mine = self._rng_now().get("cuda")
        if mine is None:  # CUDA unused: alike on every rank, which all train on the same kind of device
            return
        # The state is a byte tensor of the same size on every rank, on the CPU: NCCL takes device tensors.
        states = all_gather(mine[0].to(self.trainer.device))
        self.trainer._loop.position.cuda_rng = (self._rng_point(), [state.cpu() for state in states])

    def _rng_to_save(self) -> dict[str, Any]:
        """The generator states of a checkpoint: this rank's, with every rank's CUDA state where
        `gather_position` was called at this point."""
        cuda_rng = self.trainer._loop.position.cuda_rng
        rng = self._rng_now()
        if "cuda" in rng and cuda_rng is not None and cuda_rng[0] == self._rng_point():
            rng = {**rng, "cuda": cuda_rng[1]}
        return rng

    def _position_state(self) -> dict[str, Any] | None:
        from trainer.distributed import get_world_size

        loop = self.trainer._loop
        pos = loop.position
        if not pos.inside_epoch:
            return None
        if self.gathered is not None and self.gathered[0] == (loop.epoch, pos.batches_done):
            ranks = self.gathered[1]
        else:
            ranks = [(loop.epoch_loss.total, loop.epoch_loss.samples)]
        return {
            "epoch": loop.epoch,
            "batches": pos.batches_done,
            # One entry per rank (rank order): the epoch's training loss sum so far and its samples.
            "loss_totals": torch.stack([total.detach().clone() for total, _ in ranks]),
            "loss_samples": [samples for _, samples in ranks],
            "pending": pos.pending,
            "grads": [None if p.grad is None else p.grad.detach().clone() for p in self.trainer.module.parameters()]
            if pos.pending
            else None,
            "validated_at": pos.validated_at,
            "world_size": get_world_size(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from `state_dict` (see `fit(resume_from=...)`). Saved callback states
        that no callback of this trainer takes are left out with a warning."""
        trainer, loop = self.trainer, self.trainer._loop
        trainer.module.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        if trainer.scheduler is not None and state.get("scheduler") is not None:
            trainer.scheduler.load_state_dict(state["scheduler"])
            self._stretch_schedule(state.get("max_epochs"))
        if trainer._amp.scaler is not None and state.get("scaler") is not None:
            trainer._amp.scaler.load_state_dict(state["scaler"])
        loop.history = [dict(logs) for logs in state["history"]]
        loop.global_step = state["global_step"]
        loop.should_stop = bool(state.get("should_stop", False))
        loop.epoch = max(len(loop.history) - 1, 0)
        loop.position, self.gathered = LoopPosition(), None
        if state.get("position") is not None:
            self._restore_position(state["position"], state["rng"])
        set_rng_state(state["rng"], trainer.device)
        trainer._callbacks.load_state_dict(state.get("callbacks", {}))

    def _restore_position(self, position: dict[str, Any], rng: dict[str, Any]) -> None:
        from trainer.distributed import get_rank, get_world_size

        loop = self.trainer._loop
        pos = loop.position
        saved_world = position.get("world_size", get_world_size())
        if saved_world != get_world_size():
            raise ValueError(
                f"the checkpoint was taken inside epoch {position['epoch'] + 1} by {saved_world} process(es), whose "
                f"batches do not continue with {get_world_size()}: resume with {saved_world}, or from a checkpoint "
                "taken at an epoch's end"
            )
        loop.epoch, pos.batches_done = position["epoch"], position["batches"]
        if "loss_totals" in position:
            totals, samples = position["loss_totals"], position["loss_samples"]
        else:  # written before every rank's sums were saved: the saving rank's alone
            totals, samples = position["loss_total"].reshape(1), [position["loss_samples"]]
        # This rank's sums; saved without them (by one rank only, or by another number of ranks), the saving rank's.
        rank = get_rank() if len(samples) == get_world_size() else 0
        loop.epoch_loss.total = totals[rank].clone().to(self.trainer.device)
        loop.epoch_loss.samples = samples[rank]
        pos.pending, pos.validated_at = position["pending"], position["validated_at"]
        for param, grad in zip(self.trainer.module.parameters(), position["grads"] or ()):
            param.grad = None if grad is None else grad.to(param.device)
        pos.resume = {"epoch": loop.epoch, "batches": pos.batches_done, "rng": rng}

    def continue_in_place(self) -> None:
        """A `fit` called again after one that stopped inside an epoch continues there."""
        loop = self.trainer._loop
        pos = loop.position
        if pos.inside_epoch:
            pos.resume = {
                "epoch": loop.epoch,
                "batches": pos.batches_done,
                "rng": self._rng_now(),
            }
            pos.epoch_end_rng = None

    def _stretch_schedule(self, saved_epochs: int | None) -> None:
        # A cosine schedule over the saved run's epochs, resumed with more (or fewer) epochs, would
        # climb back up after its end; it continues instead from the current rate down to its
        # minimum at the new last epoch (the chained cosine step follows T_max from here on).
        trainer = self.trainer
        scheduler = trainer.scheduler
        if (
            isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
            and trainer.scheduler_interval == "epoch"
            and saved_epochs
            and scheduler.T_max == saved_epochs != trainer.max_epochs
        ):
            scheduler.T_max = trainer.max_epochs


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) random generators.

    Args:
        seed: the seed of every generator.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Python's, NumPy's and torch's generator states: the CPU's and, once CUDA is in use, that of
    this process's GPU (`device` where it is a CUDA device with an index, else the current one)
    as ``"cuda"``, a list of one state. Under torchrun `CheckpointState.gather_position` puts every
    rank's there, in rank order, for the checkpoint rank 0 writes."""
    # The global generator is an MT19937: its legacy state is always the tuple.
    legacy = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    kind, keys, pos, has_gauss, gauss = legacy
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [torch.cuda.get_rng_state(_cuda_index(device))]
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore generator states saved by `rng_state`: this rank's CUDA state (the rank-th of
    ``"cuda"``) to this process's GPU (`device`, else the current one), where CUDA is here.

    A checkpoint written before ``"cuda"`` held one state per rank holds one per GPU the saving
    process saw; where each process has one GPU, index and rank are the same. A rank with no state
    saved for it (a run resumed with more processes, a checkpoint saved by one rank alone at an
    interruption) keeps its CUDA generator as it is; none is ever set on a GPU that is not here."""
    from trainer.distributed import get_rank

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.random.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    rank = get_rank()
    if rank < len(cuda) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda[rank], _cuda_index(device))


def _cuda_index(device: torch.device | None) -> int:
    """The index of `device` where it is a CUDA device with one, else of the current CUDA device."""
    if device is not None and device.type == "cuda" and device.index is not None:
        return device.index
    return torch.cuda.current_device()
