"""A fit into a run directory that already holds a run: resumed, it continues the newest run
there; new, it logs to a sibling ``version_N`` folder; the two never share a curve."""

from __future__ import annotations

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainer import Trainer
from trainer.callbacks import TensorBoardCallback
from trainer.callbacks.tensorboard import run_versions, writer_dir


def fit(log_dir, trainer: Trainer | None = None, epochs: int = 2) -> Trainer:
    torch.manual_seed(0)
    x = torch.randn(16, 4)
    loader = DataLoader(TensorDataset(x, x.argmax(1)), batch_size=8)
    if trainer is None:
        model = nn.Linear(4, 4)
        trainer = Trainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            nn.CrossEntropyLoss(),
            callbacks=[TensorBoardCallback(log_dir, every_n_steps=1)],
            max_epochs=epochs,
            device="cpu",
        )
    trainer.max_epochs = epochs
    trainer.fit(loader)
    return trainer


def steps(run_dir, tag="Loss/training loss") -> list[int]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_new_fits_take_the_next_version_and_leave_earlier_runs_alone(tmp_path, capsys):
    run = tmp_path / "run"
    assert writer_dir(run, resumed=False) == run  # nothing there yet
    fit(run)
    fit(run)
    fit(run)
    assert run_versions(run) == [run, run / "version_1", run / "version_2"]
    for folder in run_versions(run):
        assert steps(folder) == [1, 2, 3, 4]
    out = capsys.readouterr().out
    assert out.count("already holds a run") == 2 and str(run / "version_2") in out


def test_fit_called_again_on_the_same_trainer_continues_its_run(tmp_path, capsys):
    run = tmp_path / "run"
    trainer = fit(run, epochs=1)
    fit(run, trainer, epochs=2)  # the next cell: train one epoch more
    assert run_versions(run) == [run] and steps(run) == [1, 2, 3, 4]
    assert "already holds a run" not in capsys.readouterr().out


def test_a_resumed_fit_continues_the_newest_version(tmp_path):
    run = tmp_path / "run"
    (run / "version_3").mkdir(parents=True)  # an empty folder is no run
    fit(run)
    fit(run)
    assert writer_dir(run, resumed=True) == run / "version_4"
    assert writer_dir(run, resumed=False) == run / "version_5"


def test_a_run_stopped_before_its_first_point_is_replaced_not_kept_beside(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    with SummaryWriter(run) as killed:  # what a process killed in its first steps left: no scalar yet
        killed.add_text("config", "lr=0.1", 0)
    assert run_versions(run) == [] and writer_dir(run, resumed=False) == run
    fit(run)
    assert run_versions(run) == [run] and steps(run) == [1, 2, 3, 4]
