"""Two CPU processes under torchrun (gloo): same weights, one event stream, global val_loss, resume."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from tests.distributed_worker import accuracy, tiny_problem
from trainer import Trainer
from trainer.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([*TORCHRUN, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
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


def test_one_run_directory_with_one_event_stream(two_ranks):
    assert sorted(p.name for p in two_ranks.iterdir()) == ["rank0.pt", "rank1.pt", "run"]
    assert len(glob.glob(str(two_ranks / "run" / "**" / "events.out.tfevents.*"), recursive=True)) == 1


def test_logged_val_loss_equals_single_process_evaluation(two_ranks):
    state = load_checkpoint(two_ranks / "run" / "last.pt")
    model, _, val = tiny_problem()
    model.load_state_dict(state["model"])
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), torch.nn.CrossEntropyLoss(),
                      device="cpu", metrics={"acc": accuracy})
    logs = trainer.validate(DataLoader(val, batch_size=13))
    assert state["history"][-1]["val_loss"] == pytest.approx(logs["val_loss"], rel=1e-5)
    assert state["history"][-1]["val_acc"] == pytest.approx(logs["val_acc"], rel=1e-6)


def test_resumed_distributed_run_continues(two_ranks):
    torchrun("tests/distributed_worker.py", str(two_ranks), "3", "resume")
    rank0, rank1 = torch.load(two_ranks / "rank0.pt"), torch.load(two_ranks / "rank1.pt")
    assert len(rank0["history"]) == 3 and rank0["global_step"] == 12
    for name, tensor in rank0["model"].items():
        assert torch.equal(tensor, rank1["model"][name]), name
    assert load_checkpoint(two_ranks / "run" / "last.pt")["epochs_done"] == 3


def test_recipe_runs_unchanged_under_torchrun(tmp_path):
    run = tmp_path / "run"
    result = torchrun("-m", "recipes.nested_unet", "--train-samples", "8", "--val-samples", "4", "--image-size", "32",
                      "--batch-size", "2", "--epochs", "1", "--log-dir", str(run))
    assert result.stdout.count("best validation IoU") == 1  # printed by rank 0 only
    assert len(glob.glob(str(run / "events.out.tfevents.*"))) == 1 and (run / "last.pt").is_file()
