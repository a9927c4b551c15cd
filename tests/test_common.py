"""`recipes.common`: the run options both recipes share: --fast-dev-run, --max-time, --histograms, --checkpoint-every,
--val-every and the run's metrics.csv."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from recipes import fashion_mnist, nested_unet
from recipes.common import print_run_summary, run_cli
from tests.helpers import tiny_args
from trainer.checkpoint import load_checkpoint
from trainer_datasets import make_learnable_fashion_like, write_fashion_mnist_idx

#: The segmentation recipe's quickest run with 4 training steps per epoch.
SEGMENTATION = tiny_args(train_samples=16, val_samples=8)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("idx")
    for train, count, seed in ((True, 256, 0), (False, 64, 1)):
        write_fashion_mnist_idx(folder, *make_learnable_fashion_like(count, seed=seed), train=train)
    return folder


def recipes(idx_dir):
    """(main, options) of each recipe on small data."""
    return [(nested_unet.main, SEGMENTATION), (fashion_mnist.main, ["--data-dir", str(idx_dir), "--batch-size", "16"])]


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_fast_dev_run_checks_everything_and_keeps_nothing(idx_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for main, options in recipes(idx_dir):
        assert run_cli(main, [*options, "--fast-dev-run", "--histograms"]) == 0
        out = capsys.readouterr().out
        last = out.strip().splitlines()[-1]
        assert last.startswith("fast dev run passed in ") and "one training and one validation batch" in last
        assert "ModelCheckpoint" in last and "TensorBoardCallback" in last
    assert list(tmp_path.iterdir()) == []  # no runs/ folder, nothing else


def test_fast_dev_run_cannot_resume(tmp_path, capsys):
    assert run_cli(nested_unet.main, ["--fast-dev-run", "--resume", str(tmp_path)]) == 2
    assert "--fast-dev-run" in capsys.readouterr().err


def test_every_run_writes_metrics_csv_one_row_per_epoch(idx_dir, tmp_path):
    for index, (main, options) in enumerate(recipes(idx_dir)):
        run_dir = tmp_path / str(index)
        assert run_cli(main, [*options, "--epochs", "2", "--log-dir", str(run_dir)]) == 0
        rows = read_csv(run_dir / "metrics.csv")
        history = load_checkpoint(run_dir / "last.pt")["history"]
        assert [int(row["epoch"]) for row in rows] == [0, 1]
        assert [float(row["val_loss"]) for row in rows] == pytest.approx([logs["val_loss"] for logs in history])
        assert set(rows[0]) == {"epoch", "step", *history[0]}


def test_max_time_stops_with_a_checkpoint_and_the_resume_command(tmp_path, capsys, fake_clock):
    run_dir = tmp_path / "run"
    options = [*SEGMENTATION, "--epochs", "3"]
    fake_clock.tick = 0.4  # the limit of 1 s passes within a few steps
    assert run_cli(nested_unet.main, [*options, "--max-time", "00:00:01", "--log-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "time limit 0:00:01 reached after global step" in out
    assert f"resume with: python -m recipes.nested_unet --resume {run_dir}" in out
    state = load_checkpoint(run_dir / "last.pt")
    stopped_at = state["global_step"]
    assert 0 < stopped_at < 3 * 4
    fake_clock.tick = 0.0
    assert run_cli(nested_unet.main, ["--resume", str(run_dir)]) == 0
    state = load_checkpoint(run_dir / "last.pt")
    assert state["global_step"] == 3 * 4 and len(state["history"]) == 3


def test_bad_max_time_is_one_line(capsys):
    assert run_cli(nested_unet.main, ["--max-time", "90 minutes"]) == 2
    err = capsys.readouterr().err
    assert "--max-time" in err and "HH:MM:SS" in err and err.count("\n") == 1


def test_histograms_step_validation_and_step_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    assert (
        run_cli(
            nested_unet.main,
            [
                *SEGMENTATION,
                "--epochs",
                "2",
                "--histograms",
                "--val-every",
                "3",
                "--checkpoint-every",
                "2",
                "--log-dir",
                str(run_dir),
            ],
        )
        == 0
    )
    acc = EventAccumulator(str(run_dir), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    histograms = acc.Tags()["histograms"]
    assert any(tag.startswith("weights/") for tag in histograms)
    assert any(tag.startswith("gradients/") for tag in histograms)
    assert [e.step for e in acc.Histograms(histograms[0])] == [4, 8]  # 4 steps per epoch, at each epoch's end
    assert [e.step for e in acc.Scalars("Loss/validation")] == [3, 4, 6, 8]  # every 3 steps and at epoch ends
    assert [int(row["step"]) for row in read_csv(run_dir / "metrics.csv")] == [3, 4, 6, 8]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "mps"], "argument --device: expected auto, cpu, cuda or cuda:N, got 'mps'"),
        (["--device", "meta"], "argument --device: expected auto, cpu, cuda or cuda:N, got 'meta'"),
        (["--device", "tpu7"], "argument --device: expected auto, cpu, cuda or cuda:N, got 'tpu7'"),
        (["--seed", "99999999999999999999999"], "argument --seed: expected an integer from 0 to 9223372036854775807"),
        (["--seed", "-1"], "argument --seed: expected an integer from 0 to 9223372036854775807, got '-1'"),
        (
            ["--lr", "1e300"],
            "argument --lr: expected a positive number up to 3.403e+38 (the float32 limit), got '1e300'",
        ),
        (["--weight-decay", "1e308"], "argument --weight-decay: expected a number from 0 to 3.403e+38"),
        (["--lr", "1e38"], "Adam cannot train with lr=1e+38"),  # fits a float32, overflows in Adam's first step
        (["--checkpoint_every", "2"], "unrecognized arguments: --checkpoint_every 2; did you mean --checkpoint-every?"),
        (["--max-time", "00:00:00"], "argument --max-time: must be above zero, got '00:00:00'"),
        (["--threads", "100000"], "argument --threads: expected 1 to "),
    ],
)
def test_values_that_would_fail_later_are_refused_before_the_run_folder(tmp_path, capsys, argv, message):
    assert run_cli(nested_unet.main, [*SEGMENTATION, *argv, "--log-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "x", "--val-samples", "3"], "--val-samples has no effect with --data x; leave it out"),
        (
            ["--train-samples", "8", "--val-fraction", "0.3", "--workers", "1"],
            "--val-fraction and --workers have no effect with the built-in data (no --data); leave them out",
        ),
    ],
)
def test_options_the_data_source_ignores_are_refused_not_recorded(tmp_path, capsys, argv, message):
    assert run_cli(nested_unet.main, [*argv, "--log-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_fashion_mnist_refuses_a_momentum_beyond_float32(idx_dir, tmp_path, capsys):
    argv = ["--data-dir", str(idx_dir), "--momentum", "1e39", "--log-dir", str(tmp_path / "run")]
    assert run_cli(fashion_mnist.main, argv) == 2
    assert "argument --momentum: expected a number from 0 to 3.403e+38" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode, best", [("max", "0.7000 (epoch 2 of 4)"), ("min", "0.5000 (epoch 3 of 4)")])
def test_the_summary_names_the_best_epoch_and_skips_epochs_with_nothing_measured(tmp_path, capsys, mode, best):
    """An epoch whose IoU is NaN (no labelled pixel in its validation) is neither best nor worst."""
    history = [{"val_iou": float("nan")}, {"val_iou": 0.7}, {"val_iou": 0.5}, {"val_iou": 0.7}]
    print_run_summary(SimpleNamespace(history=history), tmp_path, "val_iou", "IoU", mode=mode)
    assert capsys.readouterr().out.splitlines()[0] == f"best validation IoU: {best}"
