"""`recipes.segmentation.SegmentationRecipe`: a segmentation recipe of one's own gets ``predict`` and
``export`` beside training, by declaring its parts only: here a tiny UNet on the synthetic nuclei,
trained one epoch, then predicting from its checkpoint and from an export of it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch.utils.data import DataLoader

from models import BCEDiceLoss, UNet, iou
from recipes.cli import RecipeArgumentParser, add_run_options, run_cli
from recipes.config import RunConfig
from recipes.option_types import positive_int
from recipes.parts import RecipeParts
from recipes.segmentation import SegmentationRecipe
from trainer import ResumableSampler
from trainer.callbacks.checkpoint import CHECKPOINT_BEST
from trainer.checkpoint import load_checkpoint
from trainer_datasets import SyntheticNuclei, write_png_file


@dataclass(kw_only=True, eq=False)
class NucleiConfig(RunConfig):
    """A run of `Nuclei`.

    Attributes:
        samples: training images; a quarter as many validate.
    """

    samples: int


class Nuclei(SegmentationRecipe[NucleiConfig, RecipeParts]):
    """A tiny UNet on 16x16 synthetic nuclei: binary masks, BCE + Dice."""

    name = "nuclei"
    config_class = NucleiConfig
    monitor, mode, monitor_label = "val_iou", "max", "IoU"

    def build_parser(self) -> RecipeArgumentParser:
        parser = RecipeArgumentParser(prog="nuclei.py", description=self.__doc__)
        parser.add_argument("--epochs", type=positive_int, default=1)
        parser.add_argument("--samples", type=positive_int, default=8)
        add_run_options(parser, "runs/nuclei")
        return parser

    def build(self, config: NucleiConfig, device: torch.device) -> RecipeParts:
        train = SyntheticNuclei(config.samples, image_size=16, seed=config.seed)
        val = SyntheticNuclei(max(1, config.samples // 4), image_size=16, seed=config.seed + 1)
        model = UNet(num_classes=1, base_filters=4)
        return RecipeParts(
            model=model,
            loss_fn=BCEDiceLoss(),  # binary masks: the checkpoints record mask_type "binary"
            optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
            train_loader=DataLoader(train, batch_size=4, sampler=ResumableSampler(train, seed=config.seed)),
            val_loader=DataLoader(val, batch_size=4),
            metrics={"iou": iou},
            data={"classes": ["nucleus"], "image_size": 16, "input_channels": 3},
        )


RUN = ["--precision", "32", "--channels-last", "off", "--threads", "1"]


@pytest.fixture
def trained(tmp_path):
    """The run folder of one epoch of `Nuclei`."""
    threads = torch.get_num_threads()
    assert run_cli(Nuclei().main, [*RUN, "--log-dir", str(tmp_path / "run")]) == 0
    torch.set_num_threads(threads)
    return tmp_path / "run"


@pytest.fixture
def pictures(tmp_path):
    """Three images of other sizes than the training's, one of them grey."""
    folder = tmp_path / "pictures"
    for name, shape in (("a", (3, 16, 16)), ("b", (3, 24, 40)), ("c", (1, 32, 32))):
        write_png_file(
            torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1)),
            folder / f"{name}.png",
        )
    return folder


def test_a_recipe_of_ones_own_predicts_masks_from_its_checkpoint(trained, pictures, tmp_path, capsys):
    """``predict`` reads what the run recorded (one class, 'binary' from its loss, trained at 16x16)
    and writes a probability map and a mask per image, at each image's own size."""
    assert load_checkpoint(trained / CHECKPOINT_BEST)["data"]["mask_type"] == "binary"
    capsys.readouterr()
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(trained / CHECKPOINT_BEST), "--images", str(pictures), "--out", str(out)]
    assert run_cli(Nuclei().main, argv) == 0
    said = capsys.readouterr().out
    assert "every image resized to 16x16, as the run trained" in said and "wrote 3 probability maps and 3 masks" in said
    assert sorted(path.name for path in out.iterdir()) == [
        f"{n}_{kind}.png" for n in "abc" for kind in ("mask", "prob")
    ]
    # A second predict into the same folder is refused in one line: nothing is replaced.
    assert run_cli(Nuclei().main, argv) == 2
    assert "already holds" in capsys.readouterr().err


def test_an_export_of_ones_own_recipe_is_smaller_and_predicts_the_same(trained, pictures, tmp_path, capsys):
    """``export`` writes the weights and description without Adam's state; ``predict`` from it
    writes the same files, byte for byte, as from the checkpoint. An existing file is never replaced."""
    exported = tmp_path / "model.pt"
    assert (
        run_cli(Nuclei().main, ["export", "--checkpoint", str(trained / CHECKPOINT_BEST), "--out", str(exported)]) == 0
    )
    assert exported.stat().st_size < (trained / CHECKPOINT_BEST).stat().st_size
    assert "optimizer" not in load_checkpoint(exported)
    outputs = {}
    for name, source in (("checkpoint", trained / CHECKPOINT_BEST), ("export", exported)):
        out = tmp_path / name
        argv = ["predict", "--checkpoint", str(source), "--images", str(pictures), "--out", str(out)]
        assert run_cli(Nuclei().main, argv) == 0
        outputs[name] = {path.name: path.read_bytes() for path in sorted(out.iterdir())}
    assert outputs["export"] == outputs["checkpoint"] and len(outputs["export"]) == 6
    capsys.readouterr()
    assert (
        run_cli(Nuclei().main, ["export", "--checkpoint", str(trained / CHECKPOINT_BEST), "--out", str(exported)]) == 2
    )
    assert "exists already" in capsys.readouterr().err


def test_the_commands_help_names_the_recipe_that_runs_them(capsys):
    """``predict --help`` shows the recipe's own command, as it was started."""
    assert run_cli(Nuclei().main, ["predict", "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m {__name__} predict")
