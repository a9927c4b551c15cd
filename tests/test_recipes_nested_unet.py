"""The NestedUNet recipe end to end on tiny data: tags, checkpoints, prediction, errors, resume."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from recipes import nested_unet
from recipes.cli import parse_command_line, run_cli
from recipes.nested_unet_options import NestedUNetConfig
from tests.helpers import tiny_args, undocumented_options
from trainer import Trainer, WarmupCosineLR
from trainer.callbacks import ModelCheckpoint
from trainer.callbacks.palette import class_colours
from trainer.checkpoint import load_checkpoint
from trainer_datasets import SyntheticNuclei, write_png_file

#: The recipe's own network (NestedUNet) at its quickest: width 4, 8 training images of 16x16.
TINY = tiny_args(arch=None)


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
    assert set(tags["scalars"]) == {
        "Loss/training (epoch mean)",
        "Loss/validation",
        "Validation/IoU",
        "Validation/Dice",
        "learning rate",
    }  # 4 steps: no running loss at 10
    assert {"images", "masks", "predictions vs. actuals"} <= set(tags["images"])
    assert tags["graph"]
    assert (tiny_run / "best.pt").is_file() and (tiny_run / "last.pt").is_file()
    history = load_checkpoint(tiny_run / "last.pt")["history"]
    assert [e.value for e in read(tiny_run).Scalars("Validation/IoU")] == pytest.approx([h["val_iou"] for h in history])


def parts_of(argv):
    """What the recipe builds for the command line `argv`."""
    recipe = nested_unet.NestedUNetRecipe()
    config = recipe.new_config(parse_command_line(recipe.build_parser(), argv))
    return recipe.build(config, torch.device("cpu"))


def test_the_default_schedule_warms_up_then_anneals_step_by_step_over_the_run():
    parts = parts_of(tiny_args(train_samples=40, epochs=3))  # 10 steps an epoch
    schedule = parts.scheduler
    assert isinstance(schedule, WarmupCosineLR) and parts.scheduler_interval == "step"
    assert (schedule.total_steps, schedule.warmup_steps) == (30, 3)
    assert schedule.get_last_lr() == pytest.approx([3e-3 / 3])  # the first step: a third of --lr
    per_epoch = parts_of(tiny_args(scheduler="cosine"))
    assert isinstance(per_epoch.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert per_epoch.scheduler_interval == "epoch"


def test_a_run_ends_at_a_hundredth_of_its_learning_rate(tiny_run):
    history = load_checkpoint(tiny_run / "last.pt")["history"]
    assert history[0]["lr"] > 1e-3 and history[-1]["lr"] == pytest.approx(3e-5)


def test_summary_lines(tmp_path, capsys):
    assert run(TINY + ["--log-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "best validation IoU:" in out and f"run written to: {tmp_path / 'r'}" in out
    assert f"python -m trainer.board {tmp_path / 'r'}" in out


def test_folder_data_and_unet(tmp_path):
    SyntheticNuclei(10, image_size=32, seed=3).save(tmp_path / "data")
    argv = [
        "--data",
        str(tmp_path / "data"),
        "--arch",
        "UNet",
        "--base-filters",
        "4",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--optimizer",
        "sgd",
        "--scheduler",
        "plateau",
        "--log-dir",
        str(tmp_path / "run"),
    ]
    assert run(argv) == 0
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    config = state["config"]
    assert config["arch"] == "UNet" and config["image_size"] is None  # trained at the images' own size
    assert config["base_filters"] == 4 and state["model"]["conv4_0.conv2.weight"].shape[0] == 4 * 16
    del config["base_filters"]  # a run from before the option: the reference width
    old = NestedUNetConfig.from_saved(config, argparse.Namespace())
    assert nested_unet.build_model(old.arch, 1, base_filters=old.base_filters).conv4_0.conv2.out_channels == 32 * 16


def test_deep_supervision_run(tmp_path):
    assert run(TINY + ["--deep-supervision", "--log-dir", str(tmp_path / "ds")]) == 0
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
    steps = [e.step for e in read(run_dir).Scalars("Loss/training (epoch mean)")]
    assert steps == [2, 4]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "argument --epochs: expected a positive integer, got '0'"),
        (["--batch-size", "-3"], "argument --batch-size: expected a positive integer"),
        (["--lr", "0"], "argument --lr: expected a positive number"),
        (["--arch", "ResNet"], "argument --arch: invalid choice: 'ResNet'"),
        (["--optimizer", "rmsprop"], "argument --optimizer: invalid choice"),
        (["--scheduler", "step"], "argument --scheduler: invalid choice"),
    ],
)
def test_bad_options_exit_2_with_one_line(tmp_path, capsys, argv, message):
    assert run(argv + ["--log-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--image-size", "30"], "--image-size 30 is not a multiple of 16; try 32"),
        (["--data", "/nonexistent/folder"], "/nonexistent/folder"),
        (["--arch", "UNet", "--deep-supervision"], "--deep-supervision needs --arch NestedUNet"),
        (["--resume", "/nonexistent/run"], "no such run directory"),
    ],
)
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
    text = nested_unet.NestedUNetRecipe().build_parser().format_help()
    for option in (
        "--data",
        "--arch",
        "--deep-supervision",
        "--epochs",
        "--batch-size",
        "--lr",
        "--weight-decay",
        "--optimizer",
        "--scheduler",
        "--image-size",
        "--val-fraction",
        "--workers",
        "--device",
        "--precision",
        "--channels-last",
        "--seed",
        "--log-dir",
        "--resume",
    ):
        assert option in text
    assert undocumented_options(nested_unet.NestedUNetRecipe().build_parser()) == []


def test_command_line_exit_code_and_single_line():
    result = subprocess.run(
        [sys.executable, "-m", "recipes.nested_unet", "--epochs", "0"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--epochs" in result.stderr


@pytest.mark.parametrize(
    "option, value, saved",
    [("--lr", "0.01", "0.003"), ("--batch-size", "2", "4"), ("--arch", "UNet", "'NestedUNet'"), ("--seed", "3", "0")],
)
def test_resume_refuses_a_changed_option_and_names_it(tiny_run, capsys, option, value, saved):
    assert run(["--resume", str(tiny_run), "--epochs", "3", option, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{option} {value} differs from the run's saved {saved}" in err
    assert load_checkpoint(tiny_run / "last.pt")["epochs_done"] == 2  # nothing trained


def test_resume_accepts_the_saved_value_and_a_new_device(tmp_path):
    run_dir = tmp_path / "r"
    assert run(TINY + ["--log-dir", str(run_dir)]) == 0
    assert run(["--resume", str(run_dir), "--epochs", "2", "--batch-size", "4", "--device", "cpu"]) == 0
    assert load_checkpoint(run_dir / "last.pt")["epochs_done"] == 2


@pytest.mark.parametrize("extra", [[], ["--epochs", "1"], ["--epochs", "2"]])
def test_resuming_a_finished_run_says_it_is_complete_and_trains_nothing(tiny_run, capsys, extra):
    before = (tiny_run / "last.pt").stat().st_mtime_ns
    assert run(["--resume", str(tiny_run), *extra]) == 0
    out = capsys.readouterr().out
    assert f"run {tiny_run} is complete: it trained 2 of" in out
    assert (tiny_run / "last.pt").stat().st_mtime_ns == before


def square_less_folder(root, count=6, height=32, width=48):
    """Non-square images (height x width) with masks, written as PNGs."""
    data = SyntheticNuclei(count, image_size=width, seed=3)
    for i in range(count):
        image, mask = data[i]
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        write_png_file((image[:, :height] * 255).round().to(torch.uint8), root / "images" / f"{i}.png")
        write_png_file((mask[:, :height] * 255).to(torch.uint8), root / "masks" / f"{i}.png")
    return root


def test_non_square_folder_trains_resumes_and_predicts_at_its_own_size(tmp_path, mocker):
    data = square_less_folder(tmp_path / "data")
    run_dir = tmp_path / "r"
    shapes = []
    original = Trainer.train_step

    def spy(self, batch):
        shapes.append(tuple(batch[0].shape[-2:]))
        return original(self, batch)

    mocker.patch.object(Trainer, "train_step", spy)
    argv = [
        "--data",
        str(data),
        "--arch",
        "UNet",
        "--base-filters",
        "4",
        "--batch-size",
        "2",
        "--epochs",
        "1",
        "--log-dir",
        str(run_dir),
    ]
    assert run(argv) == 0
    assert run(["--resume", str(run_dir), "--epochs", "2"]) == 0
    assert set(shapes) == {(32, 48)}
    assert load_checkpoint(run_dir / "last.pt")["config"]["image_size"] is None
    out = tmp_path / "pred"
    assert (
        run(["predict", "--checkpoint", str(run_dir / "last.pt"), "--images", str(data / "images"), "--out", str(out)])
        == 0
    )
    with Image.open(out / "0_mask.png") as mask:
        assert mask.size == (48, 32)


def test_resume_with_data_workers_is_bit_identical(tmp_path, mocker):
    data = tmp_path / "data"
    SyntheticNuclei(12, image_size=32, seed=5).save(data)
    base = [
        "--data",
        str(data),
        "--arch",
        "UNet",
        "--base-filters",
        "4",
        "--batch-size",
        "4",
        "--workers",
        "2",
        "--epochs",
        "2",
        "--precision",
        "32",
        "--channels-last",
        "off",
    ]  # nothing probed: both runs train alike
    assert run(base + ["--log-dir", str(tmp_path / "full")]) == 0
    save = ModelCheckpoint.on_epoch_end

    def killed_after_first_epoch(self, trainer, logs):
        save(self, trainer, logs)
        raise KeyboardInterrupt

    patched = mocker.patch.object(ModelCheckpoint, "on_epoch_end", killed_after_first_epoch)
    assert run(base + ["--log-dir", str(tmp_path / "cut")]) == 130
    mocker.stop(patched)
    assert run(["--resume", str(tmp_path / "cut")]) == 0
    full, cut = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    assert full["history"] == cut["history"] and len(full["history"]) == 2
    assert all(torch.equal(full["model"][k], cut["model"][k]) for k in full["model"])


CLASSES = ["a_round", "b_long", "c", "d", "e"]


def five_class_folder(root, count=8, size=32):
    """Images with five overlapping mask classes: the nuclei cut into vertical bands (one class each)
    plus, for class e, every nucleus pixel of the left half."""
    data = SyntheticNuclei(count, image_size=size, seed=7)
    band = size // 4
    for i in range(count):
        image, mask = data[i]
        write_png_file((image * 255).round().to(torch.uint8), root / "images" / f"{i}.png")
        for k, name in enumerate(CLASSES):
            part = torch.zeros_like(mask)
            if k < 4:
                part[..., k * band : (k + 1) * band] = mask[..., k * band : (k + 1) * band]
            else:
                part[..., : size // 2] = mask[..., : size // 2]
            write_png_file((part * 255).to(torch.uint8), root / "masks" / name / f"{i}.png")
    return root


def test_five_classes_train_log_per_class_iou_coloured_grid_figure_and_predict_per_class(tmp_path):
    data = five_class_folder(tmp_path / "data")
    run_dir = tmp_path / "run"
    assert (
        run(
            [
                "--data",
                str(data),
                "--arch",
                "UNet",
                "--base-filters",
                "4",
                "--epochs",
                "1",
                "--batch-size",
                "4",
                "--log-dir",
                str(run_dir),
            ]
        )
        == 0
    )
    events = read(run_dir)
    scalars = events.Tags()["scalars"]
    assert {f"Validation/IoU/{name}" for name in CLASSES} <= set(scalars) and "Validation/IoU" in scalars
    per_class = [events.Scalars(f"Validation/IoU/{name}")[-1].value for name in CLASSES]
    assert events.Scalars("Validation/IoU")[-1].value == pytest.approx(sum(per_class) / 5, abs=1e-5)
    grid = events.Images("masks")[0]
    with Image.open(io.BytesIO(grid.encoded_image_string)) as image:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
    assert grid.height > 32  # the grid with the legend under it
    present = pixels.flatten(1).t().unique(dim=0).float()
    for colour in class_colours(5) * 255:  # every class's fixed colour, in the masks or the legend
        assert (present - colour).abs().amax(1).min() <= 2
    figure = events.Images("predictions vs. actuals")[0]
    assert (figure.width, figure.height) == (480, 8 + 2 * 24 + 2 * 249 + 8)  # the legend, a row per image (2)
    state = load_checkpoint(run_dir / "last.pt")
    assert state["config"]["classes"] == CLASSES and state["model"]["final.weight"].shape[0] == 5

    out = tmp_path / "pred"
    assert (
        run(["predict", "--checkpoint", str(run_dir / "best.pt"), "--images", str(data / "images"), "--out", str(out)])
        == 0
    )
    for name in CLASSES:
        with Image.open(out / name / "0.png") as mask:
            assert mask.size == (32, 32) and set(np.unique(mask).tolist()) <= {0, 255}
        assert (out / name / "0_prob.png").is_file()
