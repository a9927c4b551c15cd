"""`recipes.common`: the run options both recipes share: --fast-dev-run, --max-time, --histograms, --checkpoint-every,
--val-every, --verbose, the run's metrics.csv and the line printed at its start."""

from __future__ import annotations

import csv
import json
import sys
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import trainer.openmp as openmp_module
import trainer.precision_probe as precision_module
from models import BCEDiceLoss, CEDiceLoss, DeepSupervisionLoss
from recipes import fashion_mnist, nested_unet
from recipes.cli import RecipeArgumentParser, add_run_options, run_cli
from recipes.common import Recipe, print_run_summary, start_line
from recipes.config import RunConfig
from recipes.errors import UsageError
from recipes.option_types import positive_int
from recipes.parts import RecipeParts, recorded_data
from tests.helpers import tiny_args
from trainer.checkpoint import load_checkpoint
from trainer.openmp import choose_wait_policy
from trainer.precision_probe import choose_precision
from trainer.runs.threads import choose_threads
from trainer_datasets import (
    SegmentationFolder,
    make_learnable_fashion_like,
    write_fashion_mnist_idx,
    write_label_map,
    write_png_file,
)

#: What `trainer.native.cpu_features` reports on a CPU without native bf16.
AVX2_ONLY = {"avx2": True, "avx512": False, "avx512_bf16": False, "amx": False, "arm_bf16": False}
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


def start_lines(lines: str) -> list[str]:
    return [line for line in lines.splitlines() if line.startswith("precision:")]


def test_start_line_is_short_with_a_long_cache_path_and_long_reasons(mocker, monkeypatch, tmp_path):
    """The longest words each choice can print together (PyTorch's own convolution kernels read
    from a cache file deep in a long path, a 3-digit OMP_NUM_THREADS or torchrun's processes, a
    user's OpenMP setting or a busy machine) still make one line of at most 120 characters, and
    the measurements and the path stay out of it."""
    mocker.patch.object(precision_module, "cpu_features", return_value=AVX2_ONLY)
    mocker.patch.object(
        precision_module,
        "probe",
        side_effect=lambda model, device, example, candidates, **kw: {
            c: 0.7 if not c.onednn else 1.0 for c in candidates
        },
    )
    cache = tmp_path.joinpath(*["a-long-folder-name-on-a-shared-cluster"] * 8, "precision.json")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    choose_precision(model, torch.device("cpu"), torch.rand(2, 3, 8, 8), cache=cache)  # measures
    choice = choose_precision(model, torch.device("cpu"), torch.rand(2, 3, 8, 8), cache=cache)  # reads the cache
    assert len(choice.reason) > 400 and str(cache) in choice.reason and " ms" in choice.reason

    mocker.patch.object(openmp_module, "affinity_cpus", return_value=1024)
    mocker.patch.object(openmp_module, "cpu_quota", return_value=1000.5)
    threads = []
    monkeypatch.setenv("OMP_NUM_THREADS", "128")
    threads.append(choose_threads())
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    threads.append(choose_threads())
    mocker.patch.dict(sys.modules)
    sys.modules.pop("torch")  # as before torch loads
    waits = [
        choose_wait_policy(128, {}, measure=lambda: 900.0, cpus=range(1024)),
        choose_wait_policy(128, {"GOMP_SPINCOUNT": "1" * 80}, measure=lambda: 0.0, cpus=range(1024)),
    ]
    mocker.patch.object(openmp_module, "cpu_quota", return_value=None)
    waits.append(choose_wait_policy(1024, {}, cpus=range(1024)))  # each thread on a CPU of its own
    assert [str(t) for t in threads] == ["128 threads (OMP_NUM_THREADS)", "62 threads (16 processes)"]
    for thread_choice in threads:
        for wait in waits:
            line = start_line(choice, thread_choice, wait)
            assert len(line) <= 120, line
            assert line.startswith("precision: 32, contiguous, native conv (no native bf16, from cache); ")
            assert str(cache) not in line and " ms" not in line and "1" * 80 not in line


def test_verbose_prints_the_measurements_and_config_json_records_them(tmp_path, monkeypatch, capsys):
    """A run with the automatic precision prints a short line; --verbose adds why in full (each
    setting's measured time, the cache file, the CPUs counted, the OpenMP load), and config.json
    records the same either way."""
    cache_dir = tmp_path.joinpath(*["a-long-folder-name-on-a-shared-cluster"] * 6)
    monkeypatch.setenv("TRAINER_CACHE_DIR", str(cache_dir))
    auto = tiny_args(precision=None, channels_last=None)
    assert run_cli(nested_unet.main, [*auto, "--log-dir", str(tmp_path / "a"), "--verbose"]) == 0
    out = capsys.readouterr().out
    [line] = start_lines(out)
    assert len(line) <= 120 and str(cache_dir) not in line and " ms" not in line
    assert "; OpenMP " in line and (" threads (" in line or " thread (" in line)
    details = dict(row.strip().split(": ", 1) for row in out.splitlines() if row.startswith("  ") and ": " in row)
    assert set(details) == {"precision_reason", "threads_reason", "wait_policy"}
    assert " ms" in details["precision_reason"] and str(cache_dir) in details["precision_reason"]
    assert "CPU" in details["threads_reason"] and "OpenMP" in details["wait_policy"]
    recorded = json.loads((tmp_path / "a" / "config.json").read_text())
    assert {key: recorded[key] for key in details} == details
    assert "threads_reason" not in load_checkpoint(tmp_path / "a" / "last.pt")["config"]  # the run's options only

    # Without --verbose: the line alone, which says the choice came from the cache; config.json has it all.
    assert run_cli(nested_unet.main, [*auto, "--log-dir", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    [line] = start_lines(out)
    assert "from cache" in line and "precision_reason" not in out and " ms" not in out
    recorded = json.loads((tmp_path / "b" / "config.json").read_text())
    assert str(cache_dir) in recorded["precision_reason"] and " ms" in recorded["precision_reason"]
    assert recorded["threads_reason"] == details["threads_reason"]


def test_a_run_records_and_resumes_the_choice_its_trainer_made(tmp_path, monkeypatch, mocker, capsys):
    """The recipe leaves "auto" to the trainer: the choice made at the start of the fit (here a
    probe that favours channels-last) is the one line printed (and no second line of the trainer's
    own), and the one config.json, the checkpoints' options and the HParams tab record, with its
    reason. A resumed run measures nothing: it keeps the recorded choice and reason."""
    from tensorboard.plugins.hparams import metadata

    from trainer.callbacks.hparams import hparam_name

    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path / "cache"))
    mocker.patch.object(precision_module, "cpu_features", return_value=AVX2_ONLY)
    mocker.patch.object(
        precision_module,
        "probe",
        side_effect=lambda model, device, example, candidates, **kw: {
            c: 0.5 if c.channels_last else 1.0 for c in candidates
        },
    )
    run = tmp_path / "run"
    assert run_cli(nested_unet.main, [*tiny_args(precision=None, channels_last=None), "--log-dir", str(run)]) == 0
    out = capsys.readouterr().out
    [line] = start_lines(out)
    assert line.startswith("precision: 32, channels-last (no native bf16, measured); ") and "Trainer:" not in out
    state = load_checkpoint(run / "last.pt")
    assert state["precision"] == {"precision": "32", "channels_last": True, "onednn": True, "device": "cpu"}
    recorded = json.loads((run / "config.json").read_text())
    reason = recorded["precision_reason"]
    assert "probe on UNet" in reason and "kept in" in reason
    chosen = {"precision": "32", "channels_last": True, "onednn": True, "precision_reason": reason}
    assert {key: recorded[key] for key in chosen} == chosen
    assert {key: state["config"][key] for key in chosen} == chosen
    acc = EventAccumulator(str(run))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")[metadata.SESSION_START_INFO_TAG]
    shown = metadata.parse_session_start_info_plugin_data(content).hparams
    assert shown[hparam_name("precision")].string_value == "32"
    assert shown["precision_reason"].string_value == reason

    precision_module.probe.side_effect = AssertionError("a resumed run measures nothing")
    assert run_cli(nested_unet.main, ["--resume", str(run), "--epochs", "2"]) == 0
    [line] = start_lines(capsys.readouterr().out)
    assert line.startswith("precision: 32, channels-last (saved with the run); ")
    state = load_checkpoint(run / "last.pt")
    assert len(state["history"]) == 2 and state["precision"]["channels_last"] is True
    assert {key: state["config"][key] for key in chosen} == chosen


def test_a_run_given_precision_and_memory_format_records_them_as_asked(tmp_path, capsys):
    """Nothing left to choose: the start line and config.json say so, and nothing is measured."""
    run = tmp_path / "run"
    assert run_cli(nested_unet.main, [*tiny_args(), "--log-dir", str(run)]) == 0
    [line] = start_lines(capsys.readouterr().out)
    assert line.startswith("precision: 32, contiguous (as asked); ")
    recorded = json.loads((run / "config.json").read_text())
    assert (recorded["precision"], recorded["channels_last"], recorded["onednn"]) == ("32", False, True)
    assert recorded["precision_reason"] == "precision 32 as asked"


# --- what the checkpoints record of the data ------------------------------------------------------


class Pixels(Recipe[RunConfig, RecipeParts]):
    """Three classes per pixel of 8x8 images, told by a 1x1 convolution, with the loss and the
    ``RecipeParts.data`` a test gives."""

    name = "pixels"

    def __init__(self, loss_fn, data) -> None:
        self.loss_fn, self.data = loss_fn, data

    def build_parser(self):
        parser = RecipeArgumentParser(prog="pixels.py")
        parser.add_argument("--epochs", type=positive_int, default=1)
        add_run_options(parser, "runs/pixels")
        return parser

    def build(self, config, device):
        images = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(config.seed))
        loader = DataLoader(TensorDataset(images, images.argmax(1)), batch_size=4)
        model = nn.Conv2d(3, 3, 1)
        return RecipeParts(
            model=model,
            loss_fn=self.loss_fn,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            train_loader=loader,
            val_loader=loader,
            data=dict(self.data),
        )


PIXELS_RUN = ["--precision", "32", "--channels-last", "off"]


def test_a_run_records_how_its_outputs_are_read_without_the_recipe_saying_it(tmp_path):
    """A recipe whose data names its classes and trains with cross-entropy: its checkpoints
    record mask_type 'labels', which the recipe never gave."""
    recipe = Pixels(nn.CrossEntropyLoss(), {"classes": ["r", "g", "b"], "image_size": None})
    assert run_cli(recipe.train, [*PIXELS_RUN, "--log-dir", str(tmp_path / "run")]) == 0
    for name in ("last.pt", "best.pt"):
        data = load_checkpoint(tmp_path / "run" / name)["data"]
        assert data == {"classes": ["r", "g", "b"], "image_size": None, "mask_type": "labels"}


@pytest.mark.parametrize(
    "mask_type, message",
    [
        ("multilabel", "RecipeParts.data gives mask_type 'multilabel'; it is 'binary' (a sigmoid per class"),
        ("binary", "RecipeParts.data gives mask_type 'binary', but the run trains for 'labels' by its loss"),
    ],
    ids=["unknown", "not-what-it-trains"],
)
def test_a_mask_type_the_run_does_not_train_is_refused_before_anything_is_written(tmp_path, capsys, mask_type, message):
    recipe = Pixels(nn.CrossEntropyLoss(), {"classes": ["r", "g", "b"], "mask_type": mask_type})
    assert run_cli(recipe.train, [*PIXELS_RUN, "--log-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "run").exists()


def label_map_folder(root):
    """A label-map folder of two 8x8 images (masks/ and classes.txt): a `SegmentationFolder` of mask_mode 'labels'."""
    for index in range(2):
        write_png_file(torch.zeros(3, 8, 8, dtype=torch.uint8), root / "images" / f"{index}.png")
        write_label_map(torch.zeros(8, 8, dtype=torch.long), root / "masks" / f"{index}.png")
    (root / "classes.txt").write_text("background\ncell\n")
    return SegmentationFolder(root)


@pytest.mark.parametrize(
    "loss_fn, dataset, expected",
    [
        (DeepSupervisionLoss(CEDiceLoss()), None, "labels"),
        (nn.CrossEntropyLoss(), None, "labels"),
        (DeepSupervisionLoss(BCEDiceLoss()), None, "binary"),
        (nn.BCEWithLogitsLoss(), None, "binary"),
        (lambda predicted, target: (predicted - target).abs().mean(), None, None),
        (nn.BCELoss(), None, None),  # probabilities from the model's own sigmoid: not what predict reads
        (lambda predicted, target: (predicted - target).abs().mean(), "folder", "labels"),
        (nn.BCEWithLogitsLoss(), "subset", "labels"),  # the data's mask mode first
    ],
    ids=["ce-dice", "cross-entropy", "bce-dice", "bce-with-logits", "function", "bce", "folder", "subset"],
)
def test_recorded_data_reads_the_mask_type_from_the_training_data_or_the_loss(tmp_path, loss_fn, dataset, expected):
    data: object = TensorDataset(torch.zeros(2, 3, 8, 8))
    if dataset is not None:
        folder = label_map_folder(tmp_path)
        data = folder if dataset == "folder" else Subset(folder, [1, 0])
    model = nn.Conv2d(3, 2, 1)
    parts = RecipeParts(
        model=model,
        loss_fn=loss_fn,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_loader=DataLoader(data, batch_size=2),
        val_loader=None,
        data={"classes": ["background", "cell"]},
    )
    recorded = recorded_data(parts)
    assert recorded.get("mask_type") == expected and recorded["classes"] == ["background", "cell"]
    assert parts.data == {"classes": ["background", "cell"]}  # the recipe's own dict is left as it was
    if expected is not None:
        parts.data["mask_type"] = expected
        assert recorded_data(parts) == recorded  # given and told alike: accepted
        parts.data["mask_type"] = {"labels": "binary", "binary": "labels"}[expected]
        with pytest.raises(UsageError, match=f"but the run trains for {expected!r}"):
            recorded_data(parts)
