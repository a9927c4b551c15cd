"""Run by tests/test_distributed.py under torchrun: a tiny fit whose results each rank saves."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainer import Callback, Trainer
from trainer.callbacks import EarlyStopping, ModelCheckpoint, PRCurveCallback, TensorBoardCallback
from trainer.distributed import get_rank


def tiny_problem(train_samples: int = 32) -> tuple[nn.Module, TensorDataset, TensorDataset]:
    """A small conv net with batch norm and a learnable 3-class problem (13 validation samples)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(45, 1, 8, 8, generator=g)
    y = x[:, 0, 0, :3].argmax(1)
    return model, TensorDataset(x[:train_samples], y[:train_samples]), TensorDataset(x[32:], y[32:])


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.argmax(1) == target).float().mean()


def record_collectives() -> list[tuple[str, str]]:
    """Wrap the tensor collectives the trainer calls; the list fills with (name, tensor device)."""
    seen: list[tuple[str, str]] = []
    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce"):
        original = getattr(torch.distributed, name)

        def spy(tensor, *args, _name=name, _original=original, **kwargs):
            tensors = tensor if isinstance(tensor, (list, tuple)) else [tensor]
            seen.extend((_name, str(t.device)) for t in tensors)
            return _original(tensor, *args, **kwargs)

        setattr(torch.distributed, name, spy)
    return seen


class ExitAt(Callback):
    """Ends the process at once, like a kill, at the end of global step `step` (after `ModelCheckpoint`)."""

    order = 200

    def __init__(self, step: int) -> None:
        self.step = step

    def on_batch_end(self, trainer, batch, outputs) -> None:
        if trainer.global_step == self.step:
            os._exit(0)


def main(out: str, epochs: int, resume: bool, val_samples: int | None = None) -> None:
    """Options beyond the arguments come from the environment: WORKER_TRAIN_SAMPLES,
    WORKER_BATCH_SIZE, WORKER_DROP_LAST (1: the training loader drops a partial last batch),
    WORKER_CHECKPOINT_EVERY (also save last.pt every N steps) and WORKER_EXIT_AT (every rank
    ends, without cleaning up, after this global step)."""
    collectives = record_collectives()
    model, train, val = tiny_problem(int(os.environ.get("WORKER_TRAIN_SAMPLES", "32")))
    if val_samples is not None:  # fewer than the ranks: some get no validation batch at all
        val = TensorDataset(*val[:val_samples])
    batch_size, drop_last = int(os.environ.get("WORKER_BATCH_SIZE", "4")), os.environ.get("WORKER_DROP_LAST") == "1"
    run = Path(out) / "run"
    every = os.environ.get("WORKER_CHECKPOINT_EVERY")
    callbacks = [
        TensorBoardCallback(run, every_n_steps=2),
        PRCurveCallback(run, ["a", "b", "c"]),
        EarlyStopping(patience=50),
        ModelCheckpoint(run, every_n_steps=int(every) if every else None),
    ]
    if os.environ.get("WORKER_EXIT_AT"):
        callbacks.append(ExitAt(int(os.environ["WORKER_EXIT_AT"])))
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        nn.CrossEntropyLoss(),
        callbacks=callbacks,
        max_epochs=epochs,
        device="cpu",
        metrics={"acc": accuracy},
        seed=3,
    )
    trainer.fit(
        DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=drop_last),
        DataLoader(val, batch_size=4),
        resume_from=run / "last.pt" if resume else None,
    )
    torch.save(
        {
            "model": trainer.module.state_dict(),
            "history": trainer.history,
            "global_step": trainer.global_step,
            "collectives": collectives,
            "device": str(trainer.device),
        },
        Path(out) / f"rank{get_rank()}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "resume", int(sys.argv[4]) if len(sys.argv) > 4 else None)
