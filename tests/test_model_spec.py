"""Self-describing checkpoints: the model spec recorded by ModelCheckpoint, and `load_model`."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from models import FashionCNN, NestedUNet, UNet
from tests.conftest import make_classification
from trainer import Callback, ModelSpecError, Trainer, load_model
from trainer.callbacks import ModelCheckpoint
from trainer.checkpoint import atomic_save, load_checkpoint
from trainer.model_spec import MODULE_KEY
from trainer.trained_model import FORMAT_VERSION, MODEL_KEYS, export_model


class ScaledNet(nn.Module):
    """A user's model whose arguments are kept as attributes."""

    def __init__(self, features: int, hidden: int = 8, scale: float = 1.0) -> None:
        super().__init__()
        self.features, self.hidden, self.scale = features, hidden, scale
        self.body = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, x):
        return self.body(x) * self.scale


class Opaque(nn.Module):
    """A user's model that does not keep its constructor argument `width`."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Linear(4, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.body(x))


class CountBatches(Callback):
    def __init__(self):
        self.batches = 0

    def on_batch_start(self, trainer, batch):
        self.batches += 1


def fit(model, run_dir, dataset, epochs=1, batch_size=8, loss=None, validate=True, **checkpoint_options):
    counter = CountBatches()
    checkpoint = ModelCheckpoint(run_dir, **({} if validate else {"monitor": None}), **checkpoint_options)
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        loss or nn.CrossEntropyLoss(),
        callbacks=[counter, checkpoint],
        max_epochs=epochs,
        device="cpu",
        seed=3,
    )
    trainer.fit(
        DataLoader(dataset, batch_size=batch_size), DataLoader(dataset, batch_size=batch_size) if validate else None
    )
    return trainer, checkpoint, counter


def test_checkpoint_records_format_model_data_and_config(tmp_path):
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3, bias=False))
    data = {"classes": ["a", "b", "c"], "input_features": 4}
    trainer, checkpoint, _ = fit(model, tmp_path, make_classification(16), data=data, config={"lr": 0.01})
    state = load_checkpoint(checkpoint.last_path)
    assert set(state) >= {*MODEL_KEYS, "optimizer", "epochs_done", "history", "rng", "callbacks"}
    assert state["format_version"] == FORMAT_VERSION
    assert state["data"] == data and state["config"] == {"lr": 0.01}
    spec = state["model_spec"]
    assert spec["class"] == "torch.nn.modules.container.Sequential"
    assert spec["args"][3] == {
        MODULE_KEY: {
            "class": "torch.nn.modules.linear.Linear",
            "args": [],
            "kwargs": {"in_features": 16, "out_features": 3, "bias": False},
        }
    }
    rebuilt = load_model(checkpoint.best_path)
    x = torch.randn(5, 4)
    assert not rebuilt.training
    assert torch.equal(rebuilt(x), trainer.model.eval()(x))


@pytest.mark.parametrize(
    "build, shape",
    [
        (lambda: UNet(num_classes=2, input_channels=1), (2, 1, 16, 16)),
        (lambda: NestedUNet(num_classes=1, input_channels=3, deep_supervision=True), (2, 3, 16, 16)),
        (lambda: FashionCNN(), (1, 1, 28, 28)),
    ],
    ids=["UNet", "NestedUNet", "FashionCNN"],
)
def test_load_model_rebuilds_the_project_models(tmp_path, build, shape):
    torch.manual_seed(0)
    model = build()
    x = torch.rand(shape)
    if isinstance(model, FashionCNN):
        data, loss = TensorDataset(x, torch.tensor([2] * shape[0])), nn.CrossEntropyLoss()
    else:
        data = TensorDataset(x, (torch.rand(shape[0], model.num_classes, *shape[2:]) > 0.5).float())
        loss = lambda out, y: sum(
            nn.functional.binary_cross_entropy_with_logits(o, y)  # noqa: E731
            for o in (out if isinstance(out, list) else [out])
        )
    trainer, checkpoint, counter = fit(model, tmp_path, data, batch_size=2, loss=loss, validate=False)
    assert counter.batches == 1
    rebuilt = load_model(checkpoint.last_path)
    assert type(rebuilt) is type(model)
    expected, got = trainer.model.eval()(x), rebuilt(x)
    for a, b in zip(expected if isinstance(expected, list) else [expected], got if isinstance(got, list) else [got]):
        assert torch.equal(a, b)


def test_a_user_class_is_rebuilt_only_when_allowed(tmp_path):
    model = ScaledNet(4, hidden=6, scale=0.5)
    trainer, checkpoint, _ = fit(model, tmp_path, make_classification(16))
    with pytest.raises(
        ModelSpecError,
        match=r"names the model class (tests\.)?test_model_spec\.ScaledNet "
        r"\(ScaledNet\(features=4, hidden=6, scale=0\.5\)\), which is not "
        r"allowed.*allowed=\[ScaledNet\].*trusted=True",
    ):
        load_model(checkpoint.last_path)
    rebuilt = load_model(checkpoint.last_path, allowed=[ScaledNet])
    x = torch.randn(3, 4)
    assert rebuilt.scale == 0.5 and torch.equal(rebuilt(x), trainer.model.eval()(x))
    assert torch.equal(load_model(checkpoint.last_path, trusted=True)(x), rebuilt(x))


def test_unrecordable_arguments_fail_before_training_and_model_args_fix_it(tmp_path):
    with pytest.raises(
        ModelSpecError,
        match=r"argument 'width' of (tests\.)?test_model_spec\.Opaque: the model has no "
        r"attribute 'width'.*ModelCheckpoint\(\.\.\., model_args=",
    ):
        _, _, counter = fit(Opaque(5), tmp_path / "refused", make_classification(16))
    assert not (tmp_path / "refused").exists()  # nothing trained, nothing written

    _, checkpoint, _ = fit(Opaque(5), tmp_path / "resume-only", make_classification(16), describe_model=False)
    assert "model_spec" not in load_checkpoint(checkpoint.last_path)
    with pytest.raises(ValueError, match=r"holds weights but no model_spec .*the run did not record it"):
        load_model(checkpoint.last_path)

    model = Opaque(5)
    trainer, checkpoint, counter = fit(model, tmp_path / "given", make_classification(16), model_args={"width": 5})
    assert counter.batches == 2
    x = torch.randn(2, 4)
    assert torch.equal(load_model(checkpoint.last_path, allowed=[Opaque])(x), trainer.model.eval()(x))


def test_wrong_model_args_fail_before_training(tmp_path):
    counter = CountBatches()
    model = Opaque(5)
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        nn.CrossEntropyLoss(),
        device="cpu",
        callbacks=[counter, ModelCheckpoint(tmp_path, model_args={"width": 6})],
    )
    with pytest.raises(
        ModelSpecError,
        match=r"do not rebuild (tests\.)?test_model_spec\.Opaque: Opaque\(width=6\) has "
        r"other weights",
    ):
        trainer.fit(DataLoader(make_classification(8), batch_size=4))
    assert counter.batches == 0


EVIL_MODULE = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")
import torch
Net = torch.nn.Linear
"""


@pytest.mark.parametrize(
    "spec",
    [
        {"class": "evil_checkpoint_module.Net", "args": [], "kwargs": {"in_features": 4, "out_features": 3}},
        {"class": "os.system", "args": ["touch {marker}"], "kwargs": {}},
        {
            "class": "torch.nn.modules.container.Sequential",
            "args": [{MODULE_KEY: {"class": "evil_checkpoint_module.Net", "args": [4, 3], "kwargs": {}}}],
            "kwargs": {},
        },
    ],
    ids=["module-that-writes-on-import", "os.system", "nested-in-sequential"],
)
def test_a_module_path_a_file_names_is_never_imported(tmp_path, monkeypatch, spec):
    marker = tmp_path / "marker"
    (tmp_path / "evil_checkpoint_module.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = eval(repr(spec).replace("{marker}", str(marker)))  # noqa: S307 - the test's own literal
    model = nn.Linear(4, 3)
    atomic_save(
        {"format_version": FORMAT_VERSION, "model_spec": spec, "model": model.state_dict(), "data": {}, "config": {}},
        tmp_path / "evil.pt",
    )
    with pytest.raises(
        ModelSpecError,
        match=r"evil\.pt \(checkpoint format 2\) names the model class "
        r"(evil_checkpoint_module\.Net|os\.system).*not allowed",
    ):
        load_model(tmp_path / "evil.pt")
    assert not marker.exists() and "evil_checkpoint_module" not in sys.modules


def test_errors_say_what_the_checkpoint_is_and_lacks(tmp_path):
    model = nn.Linear(4, 3)
    atomic_save({"model": model.state_dict(), "epochs_done": 1}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"old\.pt holds weights but no model_spec .*it has no format_version"):
        load_model(tmp_path / "old.pt")
    atomic_save(model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(
        ValueError,
        match=r"bare\.pt holds no model weights \(no 'model' state dict; it holds bias, "
        r"weight\)",
    ):
        load_model(tmp_path / "bare.pt")
    state = {
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "data": {},
        "config": {},
        "model_spec": {
            "class": "torch.nn.modules.linear.Linear",
            "args": [],
            "kwargs": {"in_features": 4, "out_features": 5},
        },
    }
    atomic_save(state, tmp_path / "mixed.pt")
    with pytest.raises(ModelSpecError, match=r"weights of .*mixed\.pt \(checkpoint format 2\) do not fit Linear"):
        load_model(tmp_path / "mixed.pt")


def test_data_that_a_checkpoint_cannot_hold_is_refused_at_once(tmp_path):
    with pytest.raises(ValueError, match=r"ModelCheckpoint\(data=\.\.\.\): 'root' holds a PosixPath"):
        ModelCheckpoint(tmp_path, data={"classes": ["a"], "root": tmp_path})


def test_best_weights_only_and_export(tmp_path):
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    data = make_classification(16)
    trainer, checkpoint, _ = fit(model, tmp_path, data, epochs=2, best_weights_only=True)
    best = load_checkpoint(checkpoint.best_path)
    assert set(best) == set(MODEL_KEYS)
    assert {"optimizer", "rng"} <= set(load_checkpoint(checkpoint.last_path))
    load_model(checkpoint.best_path)
    with pytest.raises(ValueError, match=r"best\.pt' holds a weights-only checkpoint .* resume from the run's last"):
        Trainer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), device="cpu", max_epochs=3
        ).fit(DataLoader(data, batch_size=8), resume_from=checkpoint.best_path)

    exported = export_model(checkpoint.last_path, tmp_path / "deploy" / "model.pt")
    assert set(load_checkpoint(exported)) == set(MODEL_KEYS)
    x = torch.randn(2, 4)
    assert torch.equal(load_model(exported)(x), trainer.model.eval()(x))
