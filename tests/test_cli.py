"""`recipes.cli` and `recipes.config`: the recipes' command line and typed configuration: which
options a command gave, the resume command, and config.json of older runs read back."""

from __future__ import annotations

import argparse
import json

import pytest

from recipes import nested_unet
from recipes.cli import parse_command_line, resume_command, run_cli
from recipes.nested_unet import NestedUNetConfig, build_parser
from tests.helpers import tiny_args
from trainer.checkpoint import load_checkpoint
from trainer_datasets import SyntheticNuclei


def test_given_options_are_told_from_defaults_in_every_spelling():
    command = parse_command_line(build_parser(), ["--epo", "3", "--lr=0.01", "--histograms", "--seed", "0"])
    # Abbreviated, --option=value, a flag, and a value equal to its default all count as given.
    assert command.given == {"epochs": "--epochs", "lr": "--lr", "histograms": "--histograms", "seed": "--seed"}
    assert (command.args.epochs, command.args.lr, command.args.batch_size) == (3, 0.01, 4)


def test_the_resume_command_of_an_importable_recipe_is_its_module():
    assert resume_command("recipes.nested_unet", "runs/a b") == "python -m recipes.nested_unet --resume 'runs/a b'"


def test_a_config_json_of_an_older_run_resumes_with_defaults_and_keeps_unknown_values():
    saved = {
        "data": None,
        "arch": "UNet",
        "deep_supervision": False,
        "epochs": 2,
        "batch_size": 4,
        "lr": 0.003,
        "weight_decay": 0.0001,
        "optimizer": "adam",
        "scheduler": "cosine",
        "image_size": 16,
        "val_fraction": 0.2,
        "train_samples": 8,
        "val_samples": 4,
        "workers": 0,
        "device": "cpu",
        "precision": "32",
        "channels_last": False,
        "seed": 2,
        "classes": ["nucleus"],
        "retired_option": 7,
    }
    config = NestedUNetConfig.from_saved(saved, argparse.Namespace(resume="run", max_time=60.0))
    assert (config.threads, config.histograms, config.checkpoint_every) == (None, False, None)
    assert (config.resume, config.max_time, config.log_dir) == ("run", 60.0, None)
    assert dict(config)["retired_option"] == 7 and dict(config)["classes"] == ["nucleus"]
    assert not {"resume", "max_time", "log_dir", "fast_dev_run", "other"} & set(config)
    with pytest.raises(KeyError, match="declare it as a field"):
        config["no_such_option"] = 1


def test_data_given_relative_is_saved_absolute_and_the_run_resumes_from_anywhere(tmp_path, monkeypatch):
    """`--data data` in one working folder; the printed resume command run from another one
    finds the data: the run saved the folder's absolute path, which a relative --data on resume
    is compared with."""
    (tmp_path / "work").mkdir()
    SyntheticNuclei(6, image_size=16, seed=1).save(tmp_path / "work" / "data")
    monkeypatch.chdir(tmp_path / "work")
    options = tiny_args(data="data", train_samples=None, val_samples=None, log_dir=tmp_path / "run")
    assert run_cli(nested_unet.main, options) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"] == str(tmp_path / "work" / "data")
    monkeypatch.chdir(tmp_path)
    assert run_cli(nested_unet.main, ["--resume", str(tmp_path / "run"), "--epochs", "2"]) == 0
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epochs_done"] == 2
    # The same folder given again, relative to this working folder, is the run's own.
    assert run_cli(nested_unet.main, ["--resume", str(tmp_path / "run"), "--epochs", "3", "--data", "work/data"]) == 0
