"""Self-describing checkpoints: the model spec recorded by ModelCheckpoint, and `load_model`."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from models import FashionCNN, NestedUNet, UNet
from tests.conftest import make_classification
from tests.processes import checkout_env
from trainer import Callback, ModelSpecError, Trainer, load_model
from trainer.callbacks import ModelCheckpoint
from trainer.checkpoint import atomic_save, load_checkpoint
from trainer.model_spec import MAX_NESTING, MAX_SIZE, MODULE_KEY, record_model
from trainer.trained_model import FORMAT_VERSION, MODEL_KEYS, describe, export_model


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
    with pytest.raises(
        ValueError, match=r"best\.pt' holds a weights-only checkpoint .* resume from a last\.pt that training wrote"
    ):
        Trainer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), device="cpu", max_epochs=3
        ).fit(DataLoader(data, batch_size=8), resume_from=checkpoint.best_path)

    exported = export_model(checkpoint.last_path, tmp_path / "deploy" / "model.pt")
    assert set(load_checkpoint(exported)) == set(MODEL_KEYS)
    x = torch.randn(2, 4)
    assert torch.equal(load_model(exported)(x), trainer.model.eval()(x))


# --- files from elsewhere: checked before anything is allocated -------------------------------

LINEAR = "torch.nn.modules.linear.Linear"


def save_spec(path, spec, weights, data=None):
    """A checkpoint file that names `spec` and holds `weights`, as a hostile file would."""
    state = {"format_version": FORMAT_VERSION, "model_spec": spec, "model": weights, "data": data or {}, "config": {}}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))  # pickling a deep spec needs a deep stack; unpickling does not
    try:
        atomic_save(state, path)
    finally:
        sys.setrecursionlimit(limit)
    return path


def one_line_error(path, error=ModelSpecError, **options) -> str:
    with pytest.raises(error) as info:
        load_model(path, **options)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


MEASURE_LOAD = """
import resource, sys
from trainer import load_model
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_model(sys.argv[1])
except ValueError as exc:
    print("refused:", exc)
print("peak growth MB:", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_file_naming_a_huge_model_without_its_weights_is_refused_without_allocating(tmp_path):
    """A 1.5 KB file naming Linear(20000, 20000) used to allocate and initialise 1.6 GB (peak 2.2 GB)
    before its missing weights were noticed. Peak memory is a process's own: measured in a new one."""
    spec = {"class": LINEAR, "args": [], "kwargs": {"in_features": 20_000, "out_features": 20_000}}
    path = save_spec(tmp_path / "huge.pt", spec, {})
    assert path.stat().st_size < 4000
    result = subprocess.run(
        [sys.executable, "-c", MEASURE_LOAD, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=checkout_env(),
        cwd=tmp_path,
    )
    print(f"measured: {result.stdout.strip()}")
    refused, growth = result.stdout.strip().splitlines()
    assert int(growth.split(":")[1]) < 200  # the weights alone would take 1600 MB
    assert refused.startswith(f"refused: the weights of {path} (checkpoint format 2) do not fit Linear")
    assert "holds no weights" in refused


def test_weights_that_do_not_fit_are_refused_before_the_model_is_allocated(tmp_path, mocker):
    spec = {"class": LINEAR, "args": [], "kwargs": {"in_features": 4, "out_features": 3}}
    empty_like = mocker.spy(torch, "empty_like")
    wrong = {"weight": torch.zeros(3, 5), "bias": torch.zeros(3)}
    message = one_line_error(save_spec(tmp_path / "wrong.pt", spec, wrong))
    assert "weight is (3, 5) in the file but (3, 4) in the model" in message
    message = one_line_error(save_spec(tmp_path / "partial.pt", spec, {"weight": torch.zeros(3, 4)}))
    assert "1 of its 2 weights are missing (bias)" in message
    assert empty_like.call_count == 0  # nothing of the model was materialised
    assert torch.equal(
        load_model(save_spec(tmp_path / "right.pt", spec, {**wrong, "weight": torch.ones(3, 4)})).weight,
        torch.ones(3, 4),
    )
    assert empty_like.call_count == 2


def test_weights_expanded_or_repeated_from_a_few_values_are_refused(tmp_path):
    """Shapes alone can be faked: a (20000, 20000) view of one stored number loads from a tiny file."""
    spec = {"class": LINEAR, "args": [], "kwargs": {"in_features": 20_000, "out_features": 20_000}}
    weights = {"weight": torch.zeros(1).expand(20_000, 20_000), "bias": torch.zeros(20_000)}
    path = save_spec(tmp_path / "expanded.pt", spec, weights)
    assert path.stat().st_size < 100_000
    assert "the model takes 1600.1 MB, but the file holds 0.1 MB of weights" in one_line_error(path)
    layer = {"__module_spec__": {"class": LINEAR, "args": [], "kwargs": {"in_features": 1000, "out_features": 1000}}}
    shared = torch.zeros(1000, 1000)
    repeated = {
        f"{i}.{name}": shared if name == "weight" else torch.zeros(1000)
        for i in range(20)
        for name in ("weight", "bias")
    }
    spec = {"class": "torch.nn.modules.container.Sequential", "args": [layer] * 20, "kwargs": {}}
    assert "the model takes 80.1 MB, but the file holds 4.1 MB" in one_line_error(
        save_spec(tmp_path / "repeated.pt", spec, repeated)
    )


def test_a_deeply_nested_model_spec_is_one_error_naming_the_file(tmp_path):
    spec = {"class": LINEAR, "args": [], "kwargs": {"in_features": 4, "out_features": 3}}
    for _ in range(2000):  # rebuilding it used to end in a RecursionError
        spec = {"class": "torch.nn.modules.container.Sequential", "args": [{"__module_spec__": spec}], "kwargs": {}}
    message = one_line_error(save_spec(tmp_path / "deep.pt", spec, {}))
    assert f"holds a model_spec nested more than {MAX_NESTING} levels deep" in message
    deep_list: list = [4]
    for _ in range(5000):
        deep_list = [deep_list]
    spec = {"class": LINEAR, "args": [deep_list], "kwargs": {}}
    assert "nested more than" in one_line_error(save_spec(tmp_path / "deep-list.pt", spec, {}))


def test_a_model_nested_deeper_than_a_file_may_hold_is_refused_when_recorded():
    model: nn.Module = nn.Linear(4, 3)
    for _ in range(MAX_NESTING):
        model = nn.Sequential(model)
    with pytest.raises(ModelSpecError, match=r"nested more than 100 levels deep.*describe_model=False"):
        record_model(model)


@pytest.mark.parametrize(
    "spec, data, message",
    [
        (
            {"class": "models.nested_unet.NestedUNet", "args": [], "kwargs": {"num_classes": 1, "base_filters": 10**7}},
            {},
            rf"argument 'base_filters' of NestedUNet is 10000000, above {MAX_SIZE}, the largest size",
        ),
        (
            {"class": LINEAR, "args": [], "kwargs": {"in_features": 4, "out_features": 2**40}},
            {},
            rf"argument 'out_features' of Linear is 1099511627776, above {MAX_SIZE}",
        ),
        (None, {"image_size": 10**6}, r"gives image_size 1000000 in its data; .* from 1 to 8192"),
        (None, {"classes": ["c"] * 100_000}, r"gives 100000 class names as the classes .* at most 65536 names"),
        (None, {"input_channels": 10**9}, r"gives input_channels 1000000000 in its data; .* from 1 to 1024"),
    ],
    ids=["base_filters", "Linear-features", "image_size", "classes", "input_channels"],
)
def test_sizes_a_file_names_are_bounded(tmp_path, spec, data, message):
    model = nn.Linear(4, 3)
    spec = spec or {"class": LINEAR, "args": [], "kwargs": {"in_features": 4, "out_features": 3}}
    path = save_spec(tmp_path / "big.pt", spec, model.state_dict(), data)
    assert re.search(message, one_line_error(path, ValueError))


def test_a_constructor_looping_over_a_count_stops_at_what_the_file_holds(tmp_path):
    """On the meta device tensors take no memory, but the constructor of an LSTM of 20 000 layers
    still makes 80 000 parameters, a minute of work (a million layers: most of an hour and
    gigabytes): the file's one weight bounds what its model may register."""
    spec = {
        "class": "torch.nn.modules.rnn.LSTM",
        "args": [],
        "kwargs": {"input_size": 2, "hidden_size": 2, "num_layers": 20_000},
    }
    started = time.perf_counter()
    message = one_line_error(save_spec(tmp_path / "layers.pt", spec, {"weight_ih_l0": torch.zeros(8, 2)}))
    assert "builds a model with more than 1004 parameters, buffers and modules" in message
    assert time.perf_counter() - started < 10  # about 0.05 s; 60 s without the bound


class TiedNet(nn.Module):
    """A user's model with a shared weight, a buffer it does not save and a constant tensor."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.width = width
        self.encode = nn.Linear(width, width, bias=False)
        self.decode = nn.Linear(width, width, bias=False)
        self.decode.weight = self.encode.weight
        self.norm = nn.BatchNorm1d(width)

    def forward(self, x):
        return self.decode(self.norm(self.encode(x)))


class WithUnsavedBuffer(TiedNet):
    def __init__(self, width: int = 4) -> None:
        super().__init__(width)
        self.register_buffer("offset", torch.arange(width, dtype=torch.float32), persistent=False)

    def forward(self, x):
        return super().forward(x) + self.offset


@pytest.mark.parametrize("cls", [TiedNet, WithUnsavedBuffer])
def test_loaded_weights_and_buffers_are_exact_and_shared_weights_stay_shared(tmp_path, cls):
    torch.manual_seed(0)
    model = cls(4)
    model.train()(torch.randn(8, 4))  # running statistics that differ from a new model's
    state = {**describe(record_model(model), None, None), "model": model.state_dict()}
    rebuilt = load_model(save_spec(tmp_path / "tied.pt", state["model_spec"], state["model"]), allowed=[cls])
    assert rebuilt.decode.weight is rebuilt.encode.weight
    for name, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], value), name
    assert rebuilt.norm.num_batches_tracked.item() == 1
    x = torch.randn(3, 4)
    assert torch.equal(rebuilt(x), model.eval()(x))
