"""What recipes/run_checks.py refuses before a resume or a prediction writes anything: another
recipe's checkpoint, weights that do not fit their configuration, a damaged config.json or
metrics.csv, a data folder changed since the run started. Each is one line on stderr, exit 2."""

from __future__ import annotations

import shutil

import pytest
import torch

from recipes import fashion_mnist, nested_unet
from recipes.cli import run_cli
from trainer_datasets import SyntheticNuclei, make_learnable_fashion_like, write_fashion_mnist_idx

SEGMENTATION = [
    "--arch",
    "UNet",
    "--base-filters",
    "4",
    "--batch-size",
    "4",
    "--precision",
    "32",
    "--channels-last",
    "off",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished one-epoch run of each recipe (the nested_unet one on a --data folder)."""
    root = tmp_path_factory.mktemp("runs")
    SyntheticNuclei(8, image_size=32).save(root / "data")
    assert (
        run_cli(
            nested_unet.main,
            [*SEGMENTATION, "--data", str(root / "data"), "--epochs", "1", "--log-dir", str(root / "seg")],
        )
        == 0
    )
    for train, count, seed in ((True, 64, 0), (False, 32, 1)):
        write_fashion_mnist_idx(root / "idx", *make_learnable_fashion_like(count, seed=seed), train=train)
    assert (
        run_cli(
            fashion_mnist.main,
            [
                "--data-dir",
                str(root / "idx"),
                "--epochs",
                "1",
                "--batch-size",
                "16",
                "--precision",
                "32",
                "--channels-last",
                "off",
                "--log-dir",
                str(root / "fm"),
            ],
        )
        == 0
    )
    return root


def snapshot(folder):
    """Every file under `folder` with its bytes: what must not change."""
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def copy_run(runs, name, tmp_path):
    run_dir = tmp_path / name
    shutil.copytree(runs / name, run_dir)
    return run_dir


def refused(main, argv, capsys, folder, message):
    """`main(argv)` exits 2 with one line holding `message` and leaves `folder` as it was."""
    before = snapshot(folder)
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert snapshot(folder) == before


def test_a_checkpoint_of_the_other_recipe_is_refused_by_name(runs, tmp_path, capsys):
    run_dir = copy_run(runs, "fm", tmp_path)
    shutil.copy(runs / "seg" / "last.pt", run_dir / "last.pt")
    refused(
        fashion_mnist.main,
        ["--resume", str(run_dir), "--epochs", "2"],
        capsys,
        run_dir,
        f"{run_dir / 'last.pt'} is not a run of recipes.fashion_mnist (another recipe's?): its configuration "
        "has no --momentum",
    )
    seg_dir = copy_run(runs, "seg", tmp_path)
    shutil.copy(runs / "fm" / "last.pt", seg_dir / "last.pt")
    refused(
        nested_unet.main,
        ["--resume", str(seg_dir), "--epochs", "2"],
        capsys,
        seg_dir,
        "is not a run of recipes.nested_unet (another recipe's?): its configuration has no --data, --arch",
    )
    refused(
        nested_unet.main,
        [
            "predict",
            "--checkpoint",
            str(runs / "fm" / "best.pt"),
            "--images",
            str(runs / "data" / "images"),
            "--out",
            str(tmp_path / "out"),
        ],
        capsys,
        tmp_path,
        "(a checkpoint of FashionCNN) takes 1-channel inputs; predict feeds RGB images (3 channels)",
    )
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_fit_the_configuration_are_refused(runs, tmp_path, capsys):
    run_dir = copy_run(runs, "seg", tmp_path)
    state = torch.load(run_dir / "last.pt", weights_only=True)
    state["config"]["arch"] = "NestedUNet"  # the weights stay UNet's
    state["model_spec"]["class"] = "models.nested_unet.NestedUNet"
    torch.save(state, run_dir / "last.pt")
    message = f"{run_dir / 'last.pt'} holds weights of another network than its configuration describes (NestedUNet)"
    refused(nested_unet.main, ["--resume", str(run_dir), "--epochs", "2"], capsys, run_dir, message)
    refused(
        nested_unet.main,
        [
            "predict",
            "--checkpoint",
            str(run_dir / "last.pt"),
            "--images",
            str(runs / "data" / "images"),
            "--out",
            str(tmp_path / "out"),
        ],
        capsys,
        tmp_path,
        f"the weights of {run_dir / 'last.pt'} (checkpoint format 2) do not fit NestedUNet built from its model_spec",
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (bytes(range(128, 256)) * 3, "is damaged: byte 0 is not text (UTF-8 CSV expected)"),
        (b"epoch,step,loss\n0,four,0.5\n", "is damaged (line 2: invalid literal for int()"),
        (b"PNG\x00\x00garbage\n", "is not a metrics file of this project (its header has no epoch and step columns)"),
    ],
)
def test_a_garbled_metrics_csv_is_named_before_the_resume_writes(runs, tmp_path, capsys, content, message):
    run_dir = copy_run(runs, "seg", tmp_path)
    (run_dir / "metrics.csv").write_bytes(content)
    refused(
        nested_unet.main,
        ["--resume", str(run_dir), "--epochs", "2"],
        capsys,
        run_dir,
        f"{run_dir / 'metrics.csv'} {message}",
    )


def test_a_data_folder_changed_since_the_run_started_is_refused_naming_the_changes(runs, tmp_path, capsys):
    run_dir = copy_run(runs, "seg", tmp_path)
    data = runs / "data"
    extra = [data / "images" / "0100.png", data / "masks" / "0" / "0100.png"]
    try:
        shutil.copy(data / "images" / "0000.png", extra[0])
        shutil.copy(data / "masks" / "0" / "0000.png", extra[1])
        refused(
            nested_unet.main,
            ["--resume", str(run_dir), "--epochs", "2"],
            capsys,
            run_dir,
            f"--data {data} changed since the run started: 2 added (images/0100.png, masks/0/0100.png); a resumed "
            "run must train on the same data",
        )
    finally:
        for path in extra:
            path.unlink(missing_ok=True)
    original = (data / "images" / "0003.png").read_bytes()
    try:
        (data / "images" / "0003.png").write_bytes(original + b"\0")
        refused(
            nested_unet.main,
            ["--resume", str(run_dir), "--epochs", "2"],
            capsys,
            run_dir,
            "1 changed in size (images/0003.png)",
        )
    finally:
        (data / "images" / "0003.png").write_bytes(original)
    assert run_cli(nested_unet.main, ["--resume", str(run_dir), "--epochs", "2"]) == 0  # the same folder resumes
