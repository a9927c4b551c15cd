"""The GPU check: what only a GPU can prove, in one short run (under 5 minutes on one GPU), as one table.

    python -m bench.gpu_check          # needs a CUDA GPU; exits 2 with one line without one
    python -m bench.gpu_check --cpu    # the same checks with gloo on the CPU (a dry run of this code)

Rows:

- ``nccl one-rank group``: ``torchrun --nproc_per_node=1`` with ``TRAINER_DISTRIBUTED=1``, so the one
  process takes every distributed path through a real NCCL group: the tensor collectives (all on the
  GPU), the object collectives, the DistributedDataParallel wrap with ``no_sync`` accumulation, and a
  step checkpoint's gather of the loss sums and CUDA random states;
- ``kill and resume``: a run stopped after a step checkpoint, resumed from it by a new trainer: the same
  weights and history as the uninterrupted run (dropout draws from the GPU's generator, so its state
  must come back);
- ``two-GPU rng checkpoint``: a checkpoint whose ``rng["cuda"]`` lists two GPUs' states resumes on one:
  the first state on this GPU, no IndexError;
- ``label maps, no host sync``: a validation with ConfusionMatrixCallback and the label-map metrics under
  ``torch.cuda.set_sync_debug_mode("error")`` (on the CPU, `tests.helpers.HostSyncGuard`);
- ``scaler + clip + accumulate``: float16 with the grad scaler, gradient clipping and accumulation (bf16
  on the CPU) train, with the expected number of steps;
- ``trainer overhead``: the Trainer's time per step over a bare loop's, same model and batches;
- ``pytest -m cuda``: tests/test_cuda.py (not in the dry run).

The exit code is 1 when a row failed. Run it from the repository root (``PYTHONPATH=.:datasets`` where
the project is not installed: datasets/ holds `trainer_datasets`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# isort: off
import recipes  # noqa: F401 - first, as python -m recipes.NAME: it sets OpenMP's wait policy before torch loads

# isort: on
import torch
from torch import nn

from tests.distributed_worker import KillAt, Killed, record_collectives
from tests.helpers import HostSyncGuard
from tests.processes import ROOT, checkout_env
from trainer import Callback, ResumableSampler, Trainer
from trainer.callbacks import ConfusionMatrixCallback, ModelCheckpoint
from trainer.checkpoint import load_checkpoint

#: Where the one-rank child prints its result (one JSON line after this prefix).
RESULT = "GPU-CHECK-RESULT "
#: The Trainer's time per step may be at most this many times a bare loop's on CUDA.
MAX_OVERHEAD = 1.3

#: A row: (passed: True, False, or None for a figure reported without a bound; what was seen).
Row = tuple[bool | None, str]


def classifier() -> nn.Module:
    """A small classifier with dropout (which draws from the device's random generator)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 3))


def classification(n: int = 96) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 16, generator=g)
    return torch.utils.data.TensorDataset(x, x[:, :3].argmax(1))


def classifier_fit(device: torch.device, callbacks=(), epochs: int = 2, resume: Path | None = None, **options):
    """A fit of `classifier` on 96 samples in shuffled batches of 8 (12 steps an epoch)."""
    model, data = classifier(), classification()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=device.type == "cuda")
    trainer = Trainer(
        model, optimizer, nn.CrossEntropyLoss(), callbacks=list(callbacks), device=device, max_epochs=epochs, **options
    )
    loader = torch.utils.data.DataLoader(data, batch_size=8, sampler=ResumableSampler(data, seed=2))
    trainer.fit(loader, torch.utils.data.DataLoader(data, batch_size=32), resume_from=resume)
    return trainer


def same_run(a: Trainer, b: Trainer) -> tuple[bool, float]:
    """Whether two trainers hold the same history and weights, and the largest weight difference."""
    diff = max((x - y).abs().max().item() for x, y in zip(a.module.parameters(), b.module.parameters()))
    return a.history == b.history and diff == 0.0, diff


class CopyCheckpointAt(Callback):
    """Copies ``last.pt`` of `folder` to ``step<N>.pt`` at the end of global step `step` (after
    ModelCheckpoint wrote it there)."""

    order = 200

    def __init__(self, folder: Path, step: int) -> None:
        self.folder, self.step = folder, step

    def on_batch_end(self, trainer, batch, outputs) -> None:
        if trainer.global_step == self.step and (self.folder / "last.pt").is_file():
            (self.folder / f"step{self.step}.pt").write_bytes((self.folder / "last.pt").read_bytes())


def distributed_child(device: torch.device) -> dict:
    """In the one-rank torchrun child: every collective, the DDP wrap with accumulation, and a
    step checkpoint's gather; what was seen, as plain values."""
    import torch.distributed as dist

    from trainer.distributed import (
        all_gather,
        all_reduce,
        broadcast_buffers,
        broadcast_object,
        gather_to_rank_zero,
        init_distributed,
    )

    device = init_distributed(device)
    seen = record_collectives()
    reduced = all_reduce(torch.ones(2, device=device)).tolist()
    gathered = [t.tolist() for t in all_gather(torch.arange(3, device=device))]
    objects = [broadcast_object({"rank": 0}), gather_to_rank_zero({"rank": 0})]
    broadcast_buffers(nn.BatchNorm1d(4).to(device))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        callbacks = [ModelCheckpoint(folder, monitor="val_loss", every_n_steps=2), CopyCheckpointAt(folder, 4)]
        run = classifier_fit(device, callbacks, epochs=1, accumulate_grad_batches=2)
        state = load_checkpoint(folder / "step4.pt")
    return {
        "backend": dist.get_backend(),
        "ddp": isinstance(run.model, nn.parallel.DistributedDataParallel),
        "devices": sorted({where for _, where in seen}),
        "collectives": sorted({name for name, _ in seen}),
        "values": [reduced, gathered, objects],
        "steps": run.global_step,
        "position": state["position"] is not None and len(state["position"]["loss_samples"]) == 1,
        "cuda_states": len(state["rng"].get("cuda", [])),
    }


def nccl_group(cpu: bool) -> Row:
    """Row 1: the one-rank group under torchrun, in a child process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    command += ["-m", "bench.gpu_check", "--child", *(["--cpu"] if cpu else [])]
    env = checkout_env(TRAINER_DISTRIBUTED="1", OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        return False, f"exit {done.returncode}: " + " ".join(done.stderr.strip().splitlines()[-3:])[-300:]
    seen = json.loads(lines[-1][len(RESULT) :])
    device = "cpu" if cpu else "cuda:0"
    ok = (
        seen["backend"] == ("gloo" if cpu else "nccl")
        and seen["ddp"]
        and seen["devices"] == [device]
        and {"all_reduce", "all_gather", "broadcast"} <= set(seen["collectives"])
        and seen["values"] == [[1.0, 1.0], [[0, 1, 2]], [{"rank": 0}, [{"rank": 0}]]]
        and seen["steps"] == 6
        and seen["position"]
        and seen["cuda_states"] == (0 if cpu else 1)
    )
    return ok, (
        f"{seen['backend']}, DDP {seen['ddp']}, collectives {','.join(seen['collectives'])} on {seen['devices']}, "
        f"{seen['steps']} steps (accumulation 2), step checkpoint gathered, CUDA states {seen['cuda_states']}"
    )


def kill_and_resume(device: torch.device) -> Row:
    """Row 2: stopped after the step-10 checkpoint and resumed from it: the uninterrupted run."""
    with tempfile.TemporaryDirectory() as tmp:
        full = classifier_fit(device, [ModelCheckpoint(Path(tmp) / "full", monitor=None, every_n_steps=5)])
        folder = Path(tmp) / "killed"
        with contextlib.suppress(Killed):
            classifier_fit(device, [ModelCheckpoint(folder, monitor=None, every_n_steps=5), KillAt(10)])
        # The resumed trainer's generators start at seed 0 (the model's construction seeds them), not
        # where the killed run left them at step 10: the same result proves the checkpoint restored them.
        resumed = classifier_fit(
            device, [ModelCheckpoint(folder, monitor=None, every_n_steps=5)], resume=folder / "last.pt"
        )
    same, diff = same_run(full, resumed)
    history = "equal" if full.history == resumed.history else "differs"
    return same, f"killed at step 10 of {full.global_step}, resumed: history {history}, weights differ by {diff:.1e}"


def two_gpu_rng(device: torch.device) -> Row:
    """Row 3: a checkpoint listing two GPUs' random states resumes on this one GPU."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = ModelCheckpoint(tmp, monitor=None)
        classifier_fit(device, [checkpoint], epochs=1)
        state = load_checkpoint(checkpoint.last_path)
    state["callbacks"] = {}  # the trainers below have no ModelCheckpoint
    if device.type != "cuda":
        state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 2
        classifier_fit(device, epochs=1).load_state_dict(state)
        return True, "loaded on the CPU (no CUDA: the states are kept in the file, not applied)"
    states = []
    for seed in (1, 2):
        torch.cuda.manual_seed(seed)
        states.append(torch.cuda.get_rng_state())
    state["rng"]["cuda"] = states
    torch.cuda.manual_seed(3)
    classifier_fit(device, epochs=1).load_state_dict(state)
    restored = torch.equal(torch.cuda.get_rng_state(), states[0])
    return restored, f"{torch.cuda.device_count()} GPU(s) here; first state restored: {restored}"


@contextlib.contextmanager
def sync_guard(device: torch.device, batches: int) -> Iterator[Any]:
    """A callback that guards the validation's `batches` batches against host syncs: CUDA's sync
    debug mode "error" on a GPU, `HostSyncGuard` on the CPU."""
    cpu_guard = HostSyncGuard()

    def set_guard(on: bool) -> None:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error" if on else "default")
        elif on:
            cpu_guard.start()
        else:
            cpu_guard.stop()

    class Guard(Callback):
        order = 50  # after ConfusionMatrixCallback's batch hook
        seen = 0

        def on_validation_start(self, trainer) -> None:
            set_guard(True)

        def on_validation_batch_end(self, trainer, batch, outputs) -> None:
            self.seen += 1
            if self.seen == batches:
                set_guard(False)

    try:
        yield Guard()
    finally:
        set_guard(False)


def label_maps_without_sync(device: torch.device) -> Row:
    """Row 4: a label-map validation (ConfusionMatrixCallback, label_iou, label_class_iou) with every
    batch under the sync guard."""
    from models import confusion_iou, label_class_iou, label_iou

    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 16, 16, generator=g)
    labels = torch.randint(0, 3, (8, 16, 16), generator=g)
    labels[:, :4] = 255  # unlabelled rows
    batches = [(images[i : i + 2].to(device), labels[i : i + 2].to(device)) for i in range(0, 8, 2)]
    torch.manual_seed(0)
    model = nn.Conv2d(3, 3, 1)
    with tempfile.TemporaryDirectory() as tmp, sync_guard(device, len(batches)) as guard:
        callback = ConfusionMatrixCallback(tmp, ["a", "b", "c"], metrics={"iou": confusion_iou})
        trainer = Trainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            nn.CrossEntropyLoss(ignore_index=255),
            callbacks=[callback, guard],
            device=device,
            metrics={"iou_batch": label_iou(), "iou_b": label_class_iou(1)},
        )
        logs = trainer.validate(batches)
    return guard.seen == len(batches), f"{guard.seen} batches guarded; val_iou {logs['val_iou']:.3f}"


def scaler_clip_accumulate(device: torch.device) -> Row:
    """Row 5: float16 with the grad scaler (bf16 on the CPU), clipping and accumulation train."""
    precision = "16-mixed" if device.type == "cuda" else "bf16"
    trainer = classifier_fit(device, epochs=3, precision=precision, grad_clip_norm=0.5, accumulate_grad_batches=5)
    losses = [logs["loss"] for logs in trainer.history]
    scaler = trainer.scaler
    ok = (
        trainer.global_step == 9  # 12 batches an epoch in windows of 5: 3 steps
        and all(map(torch.isfinite, torch.tensor(losses)))
        and losses[-1] < losses[0]
        and (scaler is not None) == (device.type == "cuda")
    )
    scale = f", scale {scaler.get_scale():.0f}" if scaler is not None else ""
    steps = f"{trainer.global_step} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}{scale}"
    return ok, f"{precision}, clip 0.5, accumulate 5: {steps}"


def overhead(device: torch.device) -> Row:
    """Row 6: the Trainer's time per training step over a bare loop's (same model, batches, optimizer)."""
    # On CUDA, big enough that the GPU's work per step outlasts the Python that launches it, as in training.
    size, batch, width = (128, 32, 64) if device.type == "cuda" else (16, 8, 32)
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(batch, 3, size, size, generator=g).to(device),
            torch.randint(0, 10, (batch,), generator=g).to(device),
        )
        for _ in range(16)
    ]

    def model() -> nn.Module:
        torch.manual_seed(0)
        layers = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)).to(device)

    def synced() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    bare, loss_fn = model(), nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(bare.parameters(), lr=0.01)
    for passes, start in ((1, 0.0), (2, 0.0)):  # a warm-up pass, then the timed ones
        start = synced()
        for _ in range(passes):
            for x, y in batches:
                optimizer.zero_grad(set_to_none=True)
                loss_fn(bare(x), y).backward()
                optimizer.step()
        bare_s = (synced() - start) / (passes * len(batches))
    net = model()
    run = Trainer(net, torch.optim.SGD(net.parameters(), lr=0.01), loss_fn, device=device, max_epochs=1)
    run.fit(batches)  # warm-up
    run.max_epochs, start = 3, synced()
    run.fit(batches)
    ratio = (synced() - start) / (2 * len(batches)) / bare_s
    ok = ratio <= MAX_OVERHEAD if device.type == "cuda" else None
    return ok, f"{ratio:.2f}x a bare loop ({bare_s * 1000:.2f} ms/step bare; bound {MAX_OVERHEAD}x on CUDA)"


def cuda_tests() -> Row:
    """Row 7: tests/test_cuda.py."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    command += ["-W", "default::DeprecationWarning", "-W", "default::FutureWarning"]  # the GPU machine's packages
    done = subprocess.run(command, cwd=ROOT, env=checkout_env(), capture_output=True, text=True, timeout=150)
    lines = done.stdout.strip().splitlines()
    return done.returncode == 0, lines[-1] if lines else done.stderr.strip()[-200:]


def checks(device: torch.device) -> dict[str, Callable[[], Row]]:
    cpu = device.type == "cpu"
    rows: dict[str, Callable[[], Row]] = {
        f"{'gloo' if cpu else 'nccl'} one-rank group": lambda: nccl_group(cpu),
        "kill and resume": lambda: kill_and_resume(device),
        "two-GPU rng checkpoint": lambda: two_gpu_rng(device),
        "label maps, no host sync": lambda: label_maps_without_sync(device),
        "scaler + clip + accumulate": lambda: scaler_clip_accumulate(device),
        "trainer overhead": lambda: overhead(device),
    }
    if not cpu:
        rows["pytest -m cuda"] = cuda_tests
    return rows


def run_rows(rows: dict[str, Callable[[], Row]]) -> list[tuple[str, bool | None, float, str]]:
    """Each row's result; an exception fails its row with its first line, and the next rows run."""
    results = []
    for name, check in rows.items():
        started = time.perf_counter()
        try:
            ok, detail = check()
        except Exception as exc:  # noqa: BLE001 - one broken row must not hide the others
            ok, detail = False, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
        results.append((name, ok, time.perf_counter() - started, detail))
        print(f"  {name}: {'ok' if ok is not False else 'FAILED'}", file=sys.stderr, flush=True)
    return results


def print_table(results: list[tuple[str, bool | None, float, str]]) -> None:
    print(f"{'check':<28} {'result':<7} {'time':>7}  detail")
    for name, ok, seconds, detail in results:
        result = {True: "PASS", False: "FAIL", None: "INFO"}[ok]
        print(f"{name:<28} {result:<7} {seconds:>6.1f}s  {detail}")


def main(argv: list[str] | None = None) -> int:
    """Run the checks and print the table; 0 when none failed, 1 when one did, 2 without CUDA."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true", help="the same checks with gloo on the CPU (a dry run)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the torchrun child of row 1
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print(
            "error: no CUDA GPU here; python -m bench.gpu_check needs one (--cpu runs it on the CPU)", file=sys.stderr
        )
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    if args.child:
        from trainer.distributed import end_process

        print(RESULT + json.dumps(distributed_child(device)), flush=True)
        end_process(0)  # as under torchrun everywhere: no interpreter teardown, where gloo's threads can abort
    name = "CPU (gloo dry run)" if args.cpu else torch.cuda.get_device_name(0)
    print(f"GPU check on {name}, torch {torch.__version__}")
    results = run_rows(checks(device))
    print_table(results)
    return 1 if any(ok is False for _, ok, _, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
