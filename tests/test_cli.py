"""`recipes.cli` and `recipes.config`: the recipes' command line and typed configuration: which
options a command gave, the resume command (which a required option never stops), and config.json
of older runs read back."""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from recipes import nested_unet
from recipes.cli import RecipeArgumentParser, add_run_options, parse_command_line, resume_command, run_cli
from recipes.common import Recipe
from recipes.config import PATH, RunConfig
from recipes.nested_unet_options import NestedUNetConfig, build_parser
from recipes.option_types import positive_int
from recipes.parts import RecipeParts
from tests.helpers import tiny_args
from trainer import ResumableSampler
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
    saved = config.saved()  # what config.json and the checkpoints hold
    assert saved["retired_option"] == 7 and saved["classes"] == ["nucleus"] and config.classes == ["nucleus"]
    assert not {"resume", "max_time", "log_dir", "fast_dev_run", "other"} & set(saved)
    with pytest.raises(TypeError, match="NestedUNetConfig has no field 'no_such_option'"):
        config.update(no_such_option=1)


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


@dataclass(kw_only=True, eq=False)
class LineConfig(RunConfig):
    """A run of `Line`.

    Attributes:
        data: a folder the run names: a required option, as a recipe of one's own declares it.
        samples: points to fit.
    """

    data: str = field(metadata=PATH)
    samples: int


class Line(Recipe[LineConfig, RecipeParts]):
    """A line fitted to points; ``--data`` is declared ``required=True``."""

    name = "line"
    config_class = LineConfig

    def build_parser(self):
        parser = RecipeArgumentParser(prog="line.py")
        parser.add_argument("--epochs", type=positive_int, default=3)
        parser.add_argument("--data", required=True, help="a folder")
        parser.add_argument("--samples", type=positive_int, default=16)
        add_run_options(parser, "runs/line")
        return parser

    def build(self, config, device):
        x = torch.randn(config.samples, 1, generator=torch.Generator().manual_seed(config.seed))
        points = TensorDataset(x, 2 * x)
        loader = DataLoader(points, batch_size=4, sampler=ResumableSampler(points, seed=config.seed))
        model = nn.Linear(1, 1)
        return RecipeParts(
            model=model,
            loss_fn=nn.MSELoss(),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            train_loader=loader,
            val_loader=loader,
        )


def test_a_required_option_never_stops_the_printed_resume_command(tmp_path, capsys, fake_clock):
    """A new run needs ``--data``; stopped by its time limit, it prints the command that resumes
    it, and that command, without ``--data``, resumes the run with the saved one; so does
    ``--resume RUN`` alone once the run is complete. A resume that gives ``--data`` compares it
    with the saved value as usual."""

    def main(argv):
        return Line().train(argv)

    assert run_cli(main, ["--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the following arguments are required: --data" in err

    run_dir = tmp_path / "run"
    base = ["--precision", "32", "--channels-last", "off", "--log-dir", str(run_dir)]
    fake_clock.tick = 0.4  # the limit of 1 s passes within a few of the 12 steps
    assert run_cli(main, ["--data", str(tmp_path / "data"), *base, "--max-time", "00:00:01"]) == 0
    printed = [
        line.split("resume with: ", 1)[1] for line in capsys.readouterr().out.splitlines() if "resume with: " in line
    ]
    assert len(printed) == 1 and printed[0].endswith(shlex.join(["--resume", str(run_dir)]))
    assert load_checkpoint(run_dir / "last.pt")["global_step"] < 12
    fake_clock.tick = 0.0

    program = shlex.split(printed[0])
    assert run_cli(main, program[program.index("--resume") :]) == 0
    state = load_checkpoint(run_dir / "last.pt")
    assert state["global_step"] == 12 and state["config"]["data"] == str(tmp_path / "data")
    capsys.readouterr()
    assert run_cli(main, ["--resume", str(run_dir)]) == 0
    assert f"run {run_dir} is complete: it trained 3 of 3 epochs" in capsys.readouterr().out

    assert run_cli(main, ["--resume", str(run_dir), "--epochs", "4", "--data", str(tmp_path / "other")]) == 2
    assert "--data " + str(tmp_path / "other") + " differs from the run's saved" in capsys.readouterr().err
