"""Two CPU processes under torchrun (gloo): same weights, one event stream, global val_loss, resume."""

from __future__ import annotations

import glob
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util
from torch.utils.data import DataLoader

from tests.distributed_worker import accuracy, tiny_problem
from tests.processes import checkout_env
from trainer import Trainer
from trainer.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun(*args: str, timeout: float = 240, **env_vars: str) -> subprocess.CompletedProcess:
    env = checkout_env(OMP_NUM_THREADS="1", **env_vars)
    result = subprocess.run([*TORCHRUN, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun("tests/distributed_worker.py", str(out), "2", "fresh")
    return out


def test_weights_identical_on_both_ranks(two_ranks):
    rank0, rank1 = torch.load(two_ranks / "rank0.pt"), torch.load(two_ranks / "rank1.pt")
    for name, tensor in rank0["model"].items():
        assert torch.equal(tensor, rank1["model"][name]), name
    assert rank0["history"] == rank1["history"] and rank0["global_step"] == 2 * 4  # 16 samples per rank, batch 4


def test_every_collective_gets_tensors_on_the_trainers_device(two_ranks):
    # NCCL refuses CPU tensors: a tensor made without device=trainer.device would crash on GPUs.
    for rank in (0, 1):
        saved = torch.load(two_ranks / f"rank{rank}.pt")
        names = {name for name, _ in saved["collectives"]}
        assert {"all_reduce", "broadcast"} <= names, names
        assert all(device == saved["device"] for _, device in saved["collectives"]), saved["collectives"]


def test_one_run_directory_with_one_event_stream(two_ranks):
    assert sorted(p.name for p in two_ranks.iterdir()) == ["rank0.pt", "rank1.pt", "run"]
    assert len(glob.glob(str(two_ranks / "run" / "**" / "events.out.tfevents.*"), recursive=True)) == 1


def test_logged_val_loss_equals_single_process_evaluation(two_ranks):
    state = load_checkpoint(two_ranks / "run" / "last.pt")
    model, _, val = tiny_problem()
    model.load_state_dict(state["model"])
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        torch.nn.CrossEntropyLoss(),
        device="cpu",
        metrics={"acc": accuracy},
    )
    logs = trainer.validate(DataLoader(val, batch_size=13))
    assert state["history"][-1]["val_loss"] == pytest.approx(logs["val_loss"], rel=1e-5)
    assert state["history"][-1]["val_acc"] == pytest.approx(logs["val_acc"], rel=1e-6)


def test_a_run_killed_after_a_step_checkpoint_logs_the_uninterrupted_epoch_loss(two_ranks, tmp_path):
    """Both processes end at step 7 (epoch 2, batch 3), after the step-6 checkpoint: it holds every
    rank's loss sums of epoch 2 so far, so the resumed run logs the uninterrupted run's epoch loss
    (not an estimate from rank 0's share) and ends with the same history."""
    torchrun(
        "tests/distributed_worker.py", str(tmp_path), "2", "fresh", WORKER_CHECKPOINT_EVERY="3", WORKER_EXIT_AT="7"
    )
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["global_step"] == 6 and state["position"]["batches"] == 2
    assert len(state["position"]["loss_samples"]) == 2
    torchrun("tests/distributed_worker.py", str(tmp_path), "2", "resume", WORKER_CHECKPOINT_EVERY="3")
    expected = load_checkpoint(two_ranks / "run" / "last.pt")["history"][:2]  # the uninterrupted run's 2 epochs
    assert torch.load(tmp_path / "rank0.pt")["history"] == expected
    assert torch.load(tmp_path / "rank1.pt")["history"] == expected


def test_resumed_distributed_run_continues(two_ranks):
    torchrun("tests/distributed_worker.py", str(two_ranks), "3", "resume")
    rank0, rank1 = torch.load(two_ranks / "rank0.pt"), torch.load(two_ranks / "rank1.pt")
    assert len(rank0["history"]) == 3 and rank0["global_step"] == 12
    for name, tensor in rank0["model"].items():
        assert torch.equal(tensor, rank1["model"][name]), name
    assert load_checkpoint(two_ranks / "run" / "last.pt")["epochs_done"] == 3


def test_a_rank_without_validation_batches_neither_hangs_nor_raises(tmp_path):
    # One validation sample for two ranks: rank 1 gets none. Validation runs the unwrapped model,
    # so rank 0 does not wait for rank 1 inside DistributedDataParallel's forward.
    torchrun("tests/distributed_worker.py", str(tmp_path), "2", "fresh", "1", timeout=120)
    model, _, val = tiny_problem()
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0["history"] == rank1["history"] and len(rank0["history"]) == 2
    model.load_state_dict(rank0["model"])
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), torch.nn.CrossEntropyLoss(), device="cpu")
    alone = trainer.validate(DataLoader(torch.utils.data.TensorDataset(*val[:1]), batch_size=4))
    assert rank0["history"][-1]["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-5)


def test_pr_curves_cover_every_ranks_validation_samples(two_ranks):
    events = EventAccumulator(str(two_ranks / "run"), size_guidance={"tensors": 0})
    events.Reload()
    curve = events.Tensors("pr/0 a")[-1]
    counts = tensor_util.make_ndarray(curve.tensor_proto)  # rows: TP, FP, TN, FN, precision, recall
    assert counts[:4, 0].sum() == 13  # all validation samples, of both ranks' shards


def test_drop_last_is_decided_per_shard(tmp_path):
    # 10 samples, batch 8, drop_last: each rank's shard of 5 would otherwise yield no batch at all.
    torchrun(
        "tests/distributed_worker.py",
        str(tmp_path),
        "1",
        "fresh",
        WORKER_TRAIN_SAMPLES="10",
        WORKER_BATCH_SIZE="8",
        WORKER_DROP_LAST="1",
    )
    assert torch.load(tmp_path / "rank0.pt")["global_step"] == 1


def test_recipe_runs_unchanged_under_torchrun(tmp_path):
    run = tmp_path / "run"
    result = torchrun(
        "-m",
        "recipes.nested_unet",
        "--base-filters",
        "4",
        "--train-samples",
        "8",
        "--val-samples",
        "4",
        "--image-size",
        "32",
        "--batch-size",
        "2",
        "--epochs",
        "1",
        "--log-dir",
        str(run),
    )
    assert result.stdout.count("best validation IoU") == 1  # printed by rank 0 only
    assert len(glob.glob(str(run / "events.out.tfevents.*"))) == 1 and (run / "last.pt").is_file()
