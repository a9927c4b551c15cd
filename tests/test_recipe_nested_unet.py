"""The NestedUNet recipe end to end on tiny data: tags, checkpoints, prediction, errors, resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datasets import SyntheticNuclei
from recipes import nested_unet
from recipes.common import run_cli
from trainer.checkpoint import load_checkpoint

TINY = ["--train-samples", "8", "--val-samples", "4", "--image-size", "32", "--batch-size", "4", "--epochs", "1"]


def run(argv):
    return run_cli(nested_unet.main, argv)


def read(run_dir):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    assert run(TINY + ["--epochs", "2", "--log-dir", str(run_dir)]) == 0
    return run_dir


def test_tiny_run_writes_every_tag(tiny_run, capsys):
    tags = read(tiny_run).Tags()
    assert {"training loss", "validation loss", "IoU", "Dice", "learning rate"} <= set(tags["scalars"])
    assert {"images", "masks", "predictions vs. actuals"} <= set(tags["images"])
    assert tags["graph"]
    assert (tiny_run / "best.pt").is_file() and (tiny_run / "last.pt").is_file()
    history = load_checkpoint(tiny_run / "last.pt")["history"]
    assert [e.value for e in read(tiny_run).Scalars("IoU")] == pytest.approx([h["val_iou"] for h in history])


def test_summary_lines(tmp_path, capsys):
    assert run(TINY + ["--log-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "best validation IoU:" in out and f"run written to: {tmp_path / 'r'}" in out
    assert f"python -m trainer.board {tmp_path / 'r'}" in out


def test_folder_data_and_unet(tmp_path):
    SyntheticNuclei(10, image_size=32, seed=3).save(tmp_path / "data")
    argv = ["--data", str(tmp_path / "data"), "--arch", "UNet", "--epochs", "1", "--batch-size", "4",
            "--optimizer", "sgd", "--scheduler", "plateau", "--log-dir", str(tmp_path / "run")]
    assert run(argv) == 0
    config = load_checkpoint(tmp_path / "run" / "last.pt")["config"]
    assert config["arch"] == "UNet" and config["image_size"] == 32


def test_deep_supervision_run(tmp_path):
    assert run(TINY + ["--deep-supervision", "--precision", "32", "--log-dir", str(tmp_path / "ds")]) == 0
    state = load_checkpoint(tmp_path / "ds" / "best.pt")
    assert "final4.weight" in state["model"]


def test_predict_writes_maps_at_each_images_size(tiny_run, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(images / "b.png")
    out = tmp_path / "out"
    assert run(["predict", "--checkpoint", str(tiny_run / "best.pt"), "--images", str(images), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.png", "a_prob.png", "b_mask.png", "b_prob.png"]
    with Image.open(out / "a_mask.png") as mask:
        assert mask.mode == "L" and mask.size == (56, 40) and set(np.unique(mask).tolist()) <= {0, 255}
    with Image.open(out / "b_prob.png") as prob:
        assert prob.mode == "L" and prob.size == (32, 32)


def test_resume_continues_at_next_epoch(tmp_path):
    run_dir = tmp_path / "r"
    assert run(TINY + ["--log-dir", str(run_dir)]) == 0
    assert run(["--resume", str(run_dir), "--epochs", "2"]) == 0
    state = load_checkpoint(run_dir / "last.pt")
    assert state["epochs_done"] == 2 and len(state["history"]) == 2
    steps = [e.step for e in read(run_dir).Scalars("training loss")]
    assert steps == [2, 4]


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "argument --epochs: expected a positive integer, got '0'"),
    (["--batch-size", "-3"], "argument --batch-size: expected a positive integer"),
    (["--lr", "0"], "argument --lr: expected a positive number"),
    (["--arch", "ResNet"], "argument --arch: invalid choice: 'ResNet'"),
    (["--optimizer", "rmsprop"], "argument --optimizer: invalid choice"),
    (["--scheduler", "step"], "argument --scheduler: invalid choice"),
])
def test_bad_options_exit_2_with_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        run(argv + ["--log-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["--image-size", "30"], "--image-size 30 is not a multiple of 16; try 32"),
    (["--data", "/nonexistent/folder"], "/nonexistent/folder"),
    (["--arch", "UNet", "--deep-supervision"], "--deep-supervision needs --arch NestedUNet"),
    (["--resume", "/nonexistent/run"], "no such run directory"),
])
def test_bad_input_is_refused_before_training(tmp_path, capsys, argv, message):
    assert run(argv + ["--log-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without a GPU")
def test_cuda_without_gpu_is_refused(tmp_path, capsys):
    assert run(TINY + ["--device", "cuda", "--log-dir", str(tmp_path / "run")]) == 2
    assert "no CUDA GPU is available" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_log_dir_holding_a_run_is_refused(tiny_run, capsys):
    before = sorted(p.name for p in tiny_run.iterdir())
    assert run(TINY + ["--log-dir", str(tiny_run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert sorted(p.name for p in tiny_run.iterdir()) == before


def test_help_explains_every_option():
    text = nested_unet.build_parser().format_help()
    for option in ("--data", "--arch", "--deep-supervision", "--epochs", "--batch-size", "--lr", "--weight-decay",
                   "--optimizer", "--scheduler", "--image-size", "--val-fraction", "--workers", "--device",
                   "--precision", "--seed", "--log-dir", "--resume"):
        assert option in text
    assert all(action.help for action in nested_unet.build_parser()._actions)


def test_command_line_exit_code_and_single_line():
    result = subprocess.run([sys.executable, "-m", "recipes.nested_unet", "--epochs", "0"], capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--epochs" in result.stderr
