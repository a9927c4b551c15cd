"""`CheckpointState`, the part of the `Trainer` that builds and restores the state a checkpoint
holds (`state_dict`, `load_state_dict`): everything needed to continue training exactly."""

from __future__ import annotations

import random
from typing import Any, cast

import numpy as np
import torch

from trainer.attributes import TrainerAttributes
from trainer.distributed import all_gather, get_rank, get_world_size, is_distributed


class CheckpointState(TrainerAttributes):
    """The checkpoint state of a `Trainer`, as methods of it (which holds what they read)."""

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
        scaler = self._amp.scaler
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epochs_done": len(self.history),
            "max_epochs": self.max_epochs,
            "should_stop": self.should_stop,
            "global_step": self.global_step,
            "history": [dict(logs) for logs in self.history],
            "rng": self._pos.epoch_end_rng if self._pos.epoch_end_rng is not None else rng_state(),
            "precision": {"precision": self.precision, "channels_last": self.channels_last, "onednn": self.onednn},
            "callbacks": self._callbacks.state_dict(),
            "position": self._position_state(),
        }

    def gather_position(self) -> None:
        """Under torchrun, collect every rank's training loss sums of the epoch so far, so that a
        `state_dict` taken next at this position (on rank 0) holds them all and a run resumed
        from it logs that epoch's loss exactly. Every rank must call it at the same point of the
        loop; outside an epoch, and in a single process, it does nothing."""
        batches_done = self._pos.batches_done
        if batches_done is None or not is_distributed():  # outside an epoch
            return
        loss = self.epoch_loss
        local = torch.stack(
            [
                loss.total.detach().to(torch.float64),
                torch.tensor(float(loss.samples), dtype=torch.float64, device=self.device),
            ]
        )
        ranks = [(sums[0].to(loss.total.dtype), int(sums[1].item())) for sums in all_gather(local)]
        self._pos.gathered = ((self.epoch, batches_done), ranks)

    def _position_state(self) -> dict[str, Any] | None:
        pos = self._pos
        if not pos.inside_epoch:
            return None
        if pos.gathered is not None and pos.gathered[0] == (self.epoch, pos.batches_done):
            ranks = pos.gathered[1]
        else:
            ranks = [(self.epoch_loss.total, self.epoch_loss.samples)]
        return {
            "epoch": self.epoch,
            "batches": pos.batches_done,
            # One entry per rank (rank order): the epoch's training loss sum so far and its samples.
            "loss_totals": torch.stack([total.detach().clone() for total, _ in ranks]),
            "loss_samples": [samples for _, samples in ranks],
            "pending": pos.pending,
            "grads": [None if p.grad is None else p.grad.detach().clone() for p in self.module.parameters()]
            if pos.pending
            else None,
            "validated_at": pos.validated_at,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from `state_dict` (see `fit(resume_from=...)`). Saved callback states
        that no callback of this trainer takes are left out with a warning."""
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
            self._stretch_schedule(state.get("max_epochs"))
        if self._amp.scaler is not None and state.get("scaler") is not None:
            self._amp.scaler.load_state_dict(state["scaler"])
        self.history = [dict(logs) for logs in state["history"]]
        self.global_step = state["global_step"]
        self.should_stop = bool(state.get("should_stop", False))
        self.epoch = max(len(self.history) - 1, 0)
        self._pos = type(self._pos)()
        if state.get("position") is not None:
            self._restore_position(state["position"], state["rng"])
        set_rng_state(state["rng"])
        self._callbacks.load_state_dict(state.get("callbacks", {}))

    def _restore_position(self, position: dict[str, Any], rng: dict[str, Any]) -> None:
        pos = self._pos
        self.epoch, pos.batches_done = position["epoch"], position["batches"]
        if "loss_totals" in position:
            totals, samples = position["loss_totals"], position["loss_samples"]
        else:  # written before every rank's sums were saved: the saving rank's alone
            totals, samples = position["loss_total"].reshape(1), [position["loss_samples"]]
        # This rank's sums; saved without them (by one rank only, or by another number of ranks), the saving rank's.
        rank = get_rank() if len(samples) == get_world_size() else 0
        self.epoch_loss.total = totals[rank].clone().to(self.device)
        self.epoch_loss.samples = samples[rank]
        pos.pending, pos.validated_at = position["pending"], position["validated_at"]
        for param, grad in zip(self.module.parameters(), position["grads"] or ()):
            param.grad = None if grad is None else grad.to(param.device)
        pos.resume = {"epoch": self.epoch, "batches": pos.batches_done, "rng": rng}

    def _continue_in_place(self) -> None:
        """A `fit` called again after one that stopped inside an epoch continues there."""
        pos = self._pos
        if pos.inside_epoch:
            pos.resume = {
                "epoch": self.epoch,
                "batches": pos.batches_done,
                "rng": pos.epoch_end_rng if pos.epoch_end_rng is not None else rng_state(),
            }
            pos.epoch_end_rng = None

    def _stretch_schedule(self, saved_epochs: int | None) -> None:
        # A cosine schedule over the saved run's epochs, resumed with more (or fewer) epochs, would
        # climb back up after its end; it continues instead from the current rate down to its
        # minimum at the new last epoch (the chained cosine step follows T_max from here on).
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR
        if (
            isinstance(self.scheduler, cosine)
            and self.scheduler_interval == "epoch"
            and saved_epochs
            and self.scheduler.T_max == saved_epochs != self.max_epochs
        ):
            self.scheduler.T_max = self.max_epochs


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) random generators.

    Args:
        seed: the seed of every generator.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's and torch's (CPU and every CUDA device's) generator states."""
    # The global generator is an MT19937: its legacy state is always the tuple.
    legacy = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    kind, keys, pos, has_gauss, gauss = legacy
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generator states saved by `rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
