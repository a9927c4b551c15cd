"""What a checkpoint holds to continue a run exactly: `CheckpointState` builds and restores it
(`Trainer.state_dict`, `load_state_dict`). The trainer makes it on first use, so a fit that writes
and reads no checkpoint never loads this module."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from trainer.loop import LoopPosition
from trainer.rng import set_rng_state

if TYPE_CHECKING:  # pragma: no cover
    from trainer.core import Trainer


class CheckpointState:
    """The checkpoint state of one trainer: its parts' states (model, optimizer, scheduler, grad
    scaler, callbacks) and its loop's progress and position. It owns what `gather_position`
    collected from every rank for the next `state_dict`: loss sums and CUDA generator states.

    Args:
        trainer: the trainer whose state this is.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        #: Every rank's (loss sum, samples) of the epoch so far, and the ``(epoch, batches_done)``
        #: they were gathered at (see `gather_position`).
        self.gathered: tuple[tuple[int, int], list[tuple[torch.Tensor, int]]] | None = None
        #: Every rank's CUDA generator state, and the ``(global_step, epochs done, batches_done)``
        #: they were gathered at (see `gather_position`).
        self.gathered_cuda_rng: tuple[tuple[int, int, int | None], list[torch.Tensor]] | None = None

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
        from trainer.epoch_loss import non_finite_loss

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

    def _rng_point(self) -> tuple[int, int, int | None]:
        loop = self.trainer._loop
        return loop.global_step, len(loop.history), loop.position.batches_done

    def _gather_cuda_rng(self) -> None:
        from trainer.distributed import all_gather

        device = self.trainer.device
        mine = self.trainer._loop.position.rng_now(device).get("cuda")
        if mine is None:  # CUDA unused: alike on every rank, which all train on the same kind of device
            return
        # The state is a byte tensor of the same size on every rank, on the CPU: NCCL takes device tensors.
        states = all_gather(mine[0].to(device))
        self.gathered_cuda_rng = (self._rng_point(), [state.cpu() for state in states])

    def _rng_to_save(self) -> dict[str, Any]:
        """The generator states of a checkpoint: this rank's, with every rank's CUDA state where
        `gather_position` was called at this point."""
        rng, cuda_rng = self.trainer._loop.position.rng_now(self.trainer.device), self.gathered_cuda_rng
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
        loop.position, self.gathered, self.gathered_cuda_rng = LoopPosition(), None, None
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

    def _stretch_schedule(self, saved_epochs: int | None) -> None:
        # A cosine schedule over the saved run's epochs, resumed with more (or fewer) epochs, would
        # climb back up after its end; it continues instead from the current rate down to its
        # minimum at the new last epoch (the chained cosine step follows T_max from here on). A
        # scheduler with a `stretch(scale)` method (`trainer.schedules.WarmupCosineLR`) does the same itself.
        trainer = self.trainer
        scheduler = trainer.scheduler
        if not saved_epochs or saved_epochs == trainer.max_epochs:
            return
        if callable(getattr(scheduler, "stretch", None)):
            scheduler.stretch(trainer.max_epochs / saved_epochs)
        elif (
            isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
            and trainer.scheduler_interval == "epoch"
            and scheduler.T_max == saved_epochs
        ):
            scheduler.T_max = trainer.max_epochs
