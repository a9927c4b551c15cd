"""Run by tests/test_distributed.py under torchrun: tiny fits, one after another in the same two
processes, whose results each rank saves in a folder per fit (`SCENARIOS`)."""

from __future__ import annotations

import shutil
import sys
from datetime import timedelta
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainer import Callback, Trainer
from trainer.callbacks import EarlyStopping, ModelCheckpoint, PRCurveCallback, TensorBoardCallback
from trainer.distributed import end_process, get_rank, init_distributed, is_rank_zero

#: The folders of `main`'s fits, in the order they run.
SCENARIOS = ("fresh", "resumed", "killed", "one_validation_sample", "drop_last")


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


class Killed(Exception):
    """What `KillAt` raises."""


class KillAt(Callback):
    """Raises `Killed` at the end of global step `step`, after `ModelCheckpoint`: the fit ends as a
    killed process does, with the last step checkpoint as its last.pt (no checkpoint on an error)."""

    order = 200

    def __init__(self, step: int) -> None:
        self.step = step

    def on_batch_end(self, trainer, batch, outputs) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"at step {self.step}")


def fit(
    run: Path,
    epochs: int,
    resume: bool = False,
    train_samples: int = 32,
    val_samples: int | None = None,
    batch_size: int = 4,
    drop_last: bool = False,
    checkpoint_every: int | None = None,
    kill_at: int | None = None,
) -> Trainer:
    """A fit of `tiny_problem` logging to `run` (TensorBoard, PR curves, checkpoints), from
    `run`/last.pt with `resume`; `val_samples` fewer than the ranks leaves some without a batch."""
    model, train, val = tiny_problem(train_samples)
    if val_samples is not None:
        val = TensorDataset(*val[:val_samples])
    callbacks = [
        TensorBoardCallback(run, every_n_steps=2),
        PRCurveCallback(run, ["a", "b", "c"]),
        EarlyStopping(patience=50),
        ModelCheckpoint(run, every_n_steps=checkpoint_every),
        *([KillAt(kill_at)] if kill_at is not None else []),
    ]
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
    return trainer


def save(trainer: Trainer, folder: Path) -> None:
    """This rank's weights, history and step, as `folder`/rank<R>.pt."""
    result = {"model": trainer.module.state_dict(), "history": trainer.history, "global_step": trainer.global_step}
    torch.save(result, folder / f"rank{get_rank()}.pt")


def copy_on_rank_zero(source: Path, target: Path) -> None:
    """Copy a file or folder on rank 0 while the other ranks wait."""
    if is_rank_zero():
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, target)
    dist.barrier()


def main(out: Path) -> None:
    """The fits of `SCENARIOS`, each in the folder of its name under `out`:

    - fresh: 2 epochs of 32 training samples in batches of 4 (4 steps an epoch per rank);
    - resumed: a copy of fresh's run resumed to 3 epochs;
    - killed: fresh with a checkpoint every 3 steps, killed at step 7 (epoch 2, batch 3; its
      last.pt then is kept as last-at-kill.pt), then resumed to its end;
    - one_validation_sample: fresh with one validation sample, which rank 1 does not get;
    - drop_last: 1 epoch of 10 samples in batches of 8 with drop_last.

    The tensor collectives called in all of them, with their tensors' devices, go to
    `out`/collectives<R>.pt with the trainer's device."""
    collectives = record_collectives()
    for name in SCENARIOS:
        (out / name).mkdir(parents=True, exist_ok=True)
    trainer = fit(out / "fresh" / "run", epochs=2)
    save(trainer, out / "fresh")

    copy_on_rank_zero(out / "fresh" / "run", out / "resumed" / "run")
    save(fit(out / "resumed" / "run", epochs=3, resume=True), out / "resumed")

    killed = out / "killed" / "run"
    try:
        fit(killed, epochs=2, checkpoint_every=3, kill_at=7)
    except Killed:
        pass
    else:
        raise AssertionError("the run to kill at step 7 ended without being killed")
    copy_on_rank_zero(killed / "last.pt", out / "killed" / "last-at-kill.pt")
    save(fit(killed, epochs=2, resume=True, checkpoint_every=3), out / "killed")

    save(fit(out / "one_validation_sample" / "run", epochs=2, val_samples=1), out / "one_validation_sample")
    save(fit(out / "drop_last" / "run", epochs=1, train_samples=10, batch_size=8, drop_last=True), out / "drop_last")
    torch.save({"collectives": collectives, "device": str(trainer.device)}, out / f"collectives{get_rank()}.pt")


def non_finite(out: Path) -> str:
    """A fit whose rank 1 meets an infinite input in its second batch, with rank 0 logging every
    step: the name of the error this rank raised (every rank must raise the non-finite loss,
    none wait for the others in an all-reduce)."""
    model, train, _ = tiny_problem()
    images, labels = train.tensors
    images = images.clone()
    images[9] = float("inf")  # rank 1's samples are 1, 3, 5...: its second batch of 4
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        nn.CrossEntropyLoss(),
        callbacks=[TensorBoardCallback(out / "run", every_n_steps=1)],
        device="cpu",
    )
    try:
        trainer.fit(DataLoader(TensorDataset(images, labels), batch_size=4))
    except Exception as exc:  # noqa: BLE001 - what each rank raised is the result
        return type(exc).__name__
    return "nothing"


class FakeCudaGenerator:
    """torch.cuda's generator API on a CPU process: one GPU whose state is 16 bytes of `value`."""

    def __init__(self, value: int) -> None:
        self.state = torch.full((16,), value, dtype=torch.uint8)
        self.patches = [
            mock.patch("torch.cuda.is_available", return_value=True),
            mock.patch("torch.cuda.is_initialized", return_value=True),
            mock.patch("torch.cuda.current_device", return_value=0),
            mock.patch("torch.cuda.get_rng_state", side_effect=lambda device="cuda": self.state.clone()),
            mock.patch("torch.cuda.set_rng_state", side_effect=self.set),
        ]

    def set(self, state: torch.Tensor, device="cuda") -> None:
        self.state = state.clone()

    def __enter__(self) -> FakeCudaGenerator:
        for patch in self.patches:
            patch.start()
        return self

    def __exit__(self, *exc_info) -> None:
        for patch in self.patches:
            patch.stop()


def cuda_rng(out: Path) -> dict:
    """Each rank's (fake) GPU generator at 10 + rank: the CUDA states rank 0 saved in last.pt, and
    this rank's state after a resume from it (set to 0 before)."""
    run = out / "run"
    with FakeCudaGenerator(10 + get_rank()) as cuda:
        fit(run, epochs=1)
        saved = [state.tolist() for state in torch.load(run / "last.pt", weights_only=True)["rng"]["cuda"]]
        cuda.state.zero_()
        fit(run, epochs=1, resume=True)
        return {"saved": saved, "restored": cuda.state.tolist()}


class UnevenLoader(list):
    """Batches that shard themselves unevenly: rank r trains on 2 + r of them."""

    def shard(self, rank: int, world_size: int, train: bool) -> UnevenLoader:
        return UnevenLoader(self[: 2 + rank])


def uneven() -> str:
    """A fit whose ranks have 2 and 3 training batches: what this rank raised, in one line."""
    model, train, _ = tiny_problem()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), nn.CrossEntropyLoss(), device="cpu")
    try:
        trainer.fit(UnevenLoader(DataLoader(train, batch_size=4)))
    except ValueError as exc:
        return f"ValueError: {exc}"
    return "nothing"


def validate_alone(out: Path) -> dict:
    """After a fit on both ranks, rank 0 alone validates on the whole validation set (rank 1 waits
    at a barrier), then both validate on the fit's sharded validation loader together: the
    weights, rank 0's logs alone (None on rank 1) and each rank's logs of the sharded loader."""
    trainer = fit(out / "run", epochs=1)
    alone = trainer.validate(DataLoader(tiny_problem()[2], batch_size=4)) if is_rank_zero() else None
    dist.barrier()
    assert trainer.val_loader is not None  # the fit's, sharded
    return {"alone": alone, "sharded": trainer.validate(trainer.val_loader), "model": trainer.module.state_dict()}


def rank_state(out: Path) -> None:
    """The fits of test_distributed's `rank_state` fixture, with a process group that gives up
    after 30 s (a rank left waiting fails fast): `non_finite`, `cuda_rng`, `uneven` and
    `validate_alone`; each rank saves their results as `out`/rank_state<R>.pt."""
    init_distributed(torch.device("cpu"), timeout=timedelta(seconds=30))
    result: dict = {"non_finite": non_finite(out / "non_finite")}
    dist.barrier()
    result["cuda_rng"] = cuda_rng(out / "cuda_rng")
    result["uneven"] = uneven()
    result["validate_alone"] = validate_alone(out / "validate_alone")
    torch.save(result, out / f"rank_state{get_rank()}.pt")


if __name__ == "__main__":
    if sys.argv[2:] == ["rank_state"]:
        rank_state(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]))
    end_process(0)  # as recipes end under torchrun: no interpreter teardown, where gloo's threads can abort
