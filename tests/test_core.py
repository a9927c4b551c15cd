"""`trainer.core`, the Trainer: hook order, stopping, exceptions, weighted logs, steps, precision."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from tests.conftest import make_classification, make_regression
from tests.helpers import make_trainer, one_update
from trainer import HOOKS, Callback, NonFiniteLossError, StepOutput, Trainer


class Recorder(Callback):
    """Records every hook call by name."""

    def __init__(self):
        self.calls: list[str] = []

    def __getattribute__(self, name):
        if name in HOOKS:
            calls = object.__getattribute__(self, "calls")

            def record(trainer, *args):
                calls.append(name)

            return record
        return object.__getattribute__(self, name)


# Recorder overrides every hook (the class attribute must differ from Callback's).
for _hook in HOOKS:
    setattr(Recorder, _hook, lambda self, *a: None)


def expected_calls(epochs, train_batches, val_batches):
    calls = ["on_fit_start"]
    for _ in range(epochs):
        calls.append("on_epoch_start")
        calls += ["on_batch_start", "on_after_backward", "on_before_optimizer_step", "on_batch_end"] * train_batches
        if val_batches is not None:
            calls.append("on_validation_start")
            calls += ["on_validation_batch_end"] * val_batches
            calls.append("on_validation_end")
        calls.append("on_epoch_end")
    return calls + ["on_fit_end"]


def test_hook_order_with_validation(linear_model, regression_loaders):
    rec = Recorder()
    train, val = regression_loaders
    history = make_trainer(linear_model, [rec]).fit(train, val)
    assert rec.calls == expected_calls(2, train_batches=3, val_batches=3)
    assert len(history) == 2 and set(history[0]) == {"loss", "val_loss", "lr"}


def test_hook_order_without_validation(linear_model, regression_loaders):
    rec = Recorder()
    history = make_trainer(linear_model, [rec]).fit(regression_loaders[0])
    assert rec.calls == expected_calls(2, train_batches=3, val_batches=None)
    assert set(history[0]) == {"loss", "lr"}


def test_callbacks_run_in_given_order(linear_model, regression_loaders):
    order = []

    class Named(Callback):
        def __init__(self, name):
            self.name = name

        def on_epoch_end(self, trainer, logs):
            order.append(self.name)

    make_trainer(linear_model, [Named("a"), Named("b")], max_epochs=1).fit(regression_loaders[0])
    assert order == ["a", "b"]


def test_should_stop_after_epoch(linear_model, regression_loaders):
    class StopAtOne(Callback):
        def on_epoch_end(self, trainer, logs):
            if trainer.epoch == 1:
                trainer.should_stop = True

    history = make_trainer(linear_model, [StopAtOne()], max_epochs=5).fit(*regression_loaders)
    assert len(history) == 2


def test_should_stop_after_batch(linear_model, regression_loaders):
    rec = Recorder()

    class StopAfterFirstBatch(Callback):
        def on_batch_end(self, trainer, batch, outputs):
            trainer.should_stop = True

    trainer = make_trainer(linear_model, [StopAfterFirstBatch(), rec], max_epochs=3)
    history = trainer.fit(regression_loaders[0])
    assert rec.calls.count("on_batch_end") == 1
    assert len(history) == 1 and trainer.global_step == 1
    assert rec.calls[-2:] == ["on_epoch_end", "on_fit_end"]


def test_exception_in_hook_fires_on_exception_then_fit_end(linear_model, regression_loaders):
    rec, seen = Recorder(), []

    class Boom(Callback):
        def on_batch_end(self, trainer, batch, outputs):
            if trainer.batch_idx == 1:
                raise RuntimeError("boom")

        def on_exception(self, trainer, exception):
            seen.append(exception)

    with pytest.raises(RuntimeError, match="boom"):
        make_trainer(linear_model, [Boom(), rec]).fit(regression_loaders[0])
    assert rec.calls[-2:] == ["on_exception", "on_fit_end"]
    assert len(seen) == 1 and str(seen[0]) == "boom"


def test_exception_in_loss_fires_on_exception_then_fit_end(linear_model, regression_loaders):
    rec = Recorder()

    def bad_loss(pred, target):
        raise ValueError("bad loss")

    opt = torch.optim.SGD(linear_model.parameters(), lr=0.1)
    trainer = Trainer(linear_model, opt, bad_loss, callbacks=[rec], device="cpu")
    with pytest.raises(ValueError, match="bad loss"):
        trainer.fit(regression_loaders[0])
    assert rec.calls == ["on_fit_start", "on_epoch_start", "on_batch_start", "on_exception", "on_fit_end"]


def test_every_on_fit_end_runs_and_the_training_error_propagates(linear_model, regression_loaders):
    ended = []

    class Fails(Callback):
        def __init__(self, name):
            self.name = name

        def on_batch_end(self, trainer, batch, outputs):
            raise KeyError("training broke")

        def on_fit_end(self, trainer):
            ended.append(self.name)
            raise RuntimeError(f"{self.name} could not clean up")

    class Ends(Callback):
        def on_fit_end(self, trainer):
            ended.append("last")

    with pytest.raises(KeyError, match="training broke") as caught:
        make_trainer(linear_model, [Fails("first"), Ends()]).fit(regression_loaders[0])
    assert ended == ["first", "last"]
    assert any("first could not clean up" in note for note in caught.value.__notes__)


def test_errors_in_on_fit_end_alone_raise_after_every_callback_ran(linear_model, regression_loaders):
    ended = []

    class Fails(Callback):
        def __init__(self, name):
            self.name = name

        def on_fit_end(self, trainer):
            ended.append(self.name)
            raise RuntimeError(f"{self.name} failed")

    with pytest.raises(RuntimeError, match="one failed") as caught:
        make_trainer(linear_model, [Fails("one"), Fails("two")]).fit(regression_loaders[0])
    assert ended == ["one", "two"] and "two failed" in caught.value.__notes__[0]


def test_shared_writer_is_released_when_a_tensorboard_callback_fails_at_the_end(
    tmp_path, linear_model, regression_loaders, mocker
):
    from torch.utils.tensorboard import SummaryWriter

    from trainer.callbacks import PRCurveCallback, TensorBoardCallback

    closed = mocker.spy(SummaryWriter, "close")
    pr = PRCurveCallback(tmp_path, ["a"])
    mocker.patch.object(pr, "predict", side_effect=RuntimeError("cannot predict"))
    with pytest.raises(RuntimeError, match="cannot predict"):
        make_trainer(linear_model, [TensorBoardCallback(tmp_path), pr]).fit(*regression_loaders)
    assert closed.call_count == 1


def test_second_fit_continues_the_random_streams_instead_of_replaying_them(regression_loaders):
    def run(split: bool):
        torch.manual_seed(5)
        model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 1))
        train = DataLoader(make_regression(16), batch_size=4, shuffle=True)
        trainer = make_trainer(model, max_epochs=2 if split else 4, seed=1)
        trainer.fit(train)
        if split:
            trainer.max_epochs = 4
            trainer.fit(train)
        return model, trainer

    (once, t1), (twice, t2) = run(False), run(True)
    assert [h["loss"] for h in t1.history] == pytest.approx([h["loss"] for h in t2.history])
    assert all(torch.equal(a, b) for a, b in zip(once.state_dict().values(), twice.state_dict().values()))


@pytest.mark.numerics
def test_logs_are_batch_size_weighted_means(regression_loaders):
    """Uneven batches (4, 4, 2 and 3, 3, 1): logs equal a hand computation over all samples."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    train, val = regression_loaders
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights fixed: the hand computation is exact
    mae = lambda p, t: (p - t).abs().mean()  # noqa: E731
    trainer = Trainer(model, opt, nn.MSELoss(), max_epochs=1, device="cpu", metrics={"mae": mae})
    logs = trainer.fit(train, val)[0]
    with torch.no_grad():
        xt, yt = train.dataset.tensors
        xv, yv = val.dataset.tensors
        assert logs["loss"] == pytest.approx(((model(xt) - yt) ** 2).mean().item(), rel=1e-5)
        assert logs["val_loss"] == pytest.approx(((model(xv) - yv) ** 2).mean().item(), rel=1e-5)
        assert logs["val_mae"] == pytest.approx((model(xv) - yv).abs().mean().item(), rel=1e-5)
    # The unweighted mean of batch means differs: the weighting matters on these batches.
    with torch.no_grad():
        batch_means = [((model(x) - y).abs().mean()).item() for x, y in val]
    assert sum(batch_means) / len(batch_means) != pytest.approx(logs["val_mae"], rel=1e-4)


def test_validate_returns_val_logs(linear_model, regression_loaders):
    rec = Recorder()
    trainer = make_trainer(linear_model, [rec])
    logs = trainer.validate(regression_loaders[1])
    assert set(logs) == {"val_loss"} and logs["val_loss"] > 0
    assert rec.calls == ["on_validation_start"] + ["on_validation_batch_end"] * 3 + ["on_validation_end"]
    assert linear_model.training  # back to the mode it was in


class TwoHeads(nn.Module):
    """Returns a list of predictions, like a deep-supervision network."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return [self.a(x), self.b(x)]


def test_list_outputs_go_to_loss_whole_and_metrics_use_the_last():
    torch.manual_seed(0)
    model = TwoHeads()
    seen_by_loss = []

    def loss_fn(preds, target):
        seen_by_loss.append(len(preds))
        return sum(nn.functional.cross_entropy(p, target) for p in preds) / len(preds)

    def accuracy(pred, target):
        assert isinstance(pred, torch.Tensor)
        return (pred.argmax(1) == target).float().mean()

    data = DataLoader(make_classification(), batch_size=8)
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn,
        max_epochs=1,
        device="cpu",
        metrics={"acc": accuracy},
    )
    logs = trainer.fit(data, data)[0]
    assert set(seen_by_loss) == {2}
    with torch.no_grad():
        x, y = data.dataset.tensors
        expected = (model.b(x).argmax(1) == y).float().mean().item()
    assert logs["val_acc"] == pytest.approx(expected)


def test_nested_batches_are_moved_and_passed_whole():
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, inputs):
            return self.lin(inputs["x"]) + inputs["extra"][0]

    ds = make_regression(8)
    batches = [
        {"inputs": {"x": ds.tensors[0][i : i + 4], "extra": (torch.zeros(4, 1),)}, "targets": ds.tensors[1][i : i + 4]}
        for i in (0, 4)
    ]
    seen = []

    class Spy(Callback):
        def on_batch_start(self, trainer, batch):
            seen.append(batch["inputs"]["extra"][0].device)

    model = DictModel()
    trainer = Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.01), nn.MSELoss(), callbacks=[Spy()], device="cpu"
    )
    logs = trainer.fit(batches, batches)[0]
    assert math.isfinite(logs["val_loss"]) and seen == [torch.device("cpu")] * 2


def test_unknown_batch_layout_has_clear_error(linear_model):
    trainer = make_trainer(linear_model)
    with pytest.raises(TypeError, match="override Trainer.train_step"):
        trainer.fit([(torch.zeros(2, 3), torch.zeros(2, 1), torch.zeros(2))])


@pytest.mark.numerics
def test_custom_train_step_by_subclassing():
    class TripleBatch(Trainer):
        def train_step(self, batch):
            x, y, w = batch
            pred = self.model(x)
            return StepOutput((w * (pred - y) ** 2).mean(), pred, y)

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    ds = make_regression(8)
    batches = [(ds.tensors[0], ds.tensors[1], torch.ones(8, 1))]
    trainer = TripleBatch(model, torch.optim.SGD(model.parameters(), lr=0.1), None, max_epochs=3, device="cpu")
    history = trainer.fit(batches)
    print(f"measured: loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}")
    assert history[-1]["loss"] < history[0]["loss"]


@pytest.mark.numerics
def test_gradient_accumulation_equals_one_big_batch():
    ds = make_regression(8)
    x, y = ds.tensors
    small = [(x[:4], y[:4]), (x[4:], y[4:])]
    accumulated, t_acc = one_update(0, small, accumulate_grad_batches=2)
    big, t_big = one_update(0, [(x, y)])
    plain, _ = one_update(0, small)
    assert t_acc.global_step == 1 and t_big.global_step == 1
    print(
        f"measured: accumulated vs one batch {(accumulated.weight - big.weight).abs().max():.2e}, "
        f"two steps vs one batch {(plain.weight - big.weight).abs().max():.2e}"
    )
    assert torch.allclose(accumulated.weight, big.weight, atol=1e-6)
    assert not torch.allclose(plain.weight, big.weight, atol=1e-4)


def test_accumulation_steps_on_leftover_batches():
    ds = make_regression(12)
    x, y = ds.tensors
    batches = [(x[i : i + 4], y[i : i + 4]) for i in (0, 4, 8)]
    _, trainer = one_update(0, batches, accumulate_grad_batches=2)
    assert trainer.global_step == 2


@pytest.mark.numerics
def test_last_partial_accumulation_window_is_averaged_over_its_own_batches():
    # 3 batches, accumulation 2: the second update uses batch 3 alone, at full weight.
    ds = make_regression(12)
    x, y = ds.tensors
    batches = [(x[i : i + 4], y[i : i + 4]) for i in (0, 4, 8)]
    accumulated, trainer = one_update(0, batches, accumulate_grad_batches=2)
    by_hand, _ = one_update(0, [(x[:8], y[:8]), (x[8:], y[8:])])  # one big batch, then the last alone
    assert trainer.global_step == 2
    print(f"measured: accumulated vs by hand {(accumulated.weight - by_hand.weight).abs().max():.2e}")
    assert torch.allclose(accumulated.weight, by_hand.weight, atol=1e-6)
    assert torch.allclose(accumulated.bias, by_hand.bias, atol=1e-6)


def test_no_device_sync_per_batch(mocker):
    """`.item()`/`.tolist()` calls grow with epochs and log points, not with batches."""
    from trainer.callbacks import ProgressBar

    def count_syncs(num_batches, callbacks=()):
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        x, y = make_regression(num_batches * 2).tensors
        batches = [(x[i : i + 2], y[i : i + 2]) for i in range(0, len(x), 2)]
        trainer = Trainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.01),
            nn.MSELoss(),
            callbacks=callbacks,
            max_epochs=2,
            device="cpu",
        )
        count = {"n": 0}
        real_item, real_tolist = torch.Tensor.item, torch.Tensor.tolist

        def counted(real):
            def wrapper(self, *args):
                count["n"] += 1
                return real(self, *args)

            return wrapper

        mocker.patch.object(torch.Tensor, "item", counted(real_item))
        mocker.patch.object(torch.Tensor, "tolist", counted(real_tolist))
        trainer.fit(batches, batches)
        mocker.stopall()
        return count["n"]

    assert count_syncs(5) == count_syncs(50) == 4  # per epoch: training loss, validation values
    with open("/dev/null", "w") as sink:
        few = count_syncs(50, [ProgressBar(every_n_steps=25, file=sink)])
        many = count_syncs(50, [ProgressBar(every_n_steps=5, file=sink)])
    assert few == 4 + 2 * 2 and many == 4 + 2 * 10


def test_non_finite_loss_raises_clear_error(linear_model):
    x = torch.full((4, 3), float("nan"))
    trainer = make_trainer(linear_model)
    with pytest.raises(NonFiniteLossError, match="epoch 1/"):
        trainer.fit([(x, torch.zeros(4, 1))])


def test_seed_makes_runs_repeatable(regression_loaders):
    def run(noise):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Dropout(0.5), nn.Linear(3, 1))
        torch.randn(noise)  # the seed resets the generators at fit start, whatever came before
        train = DataLoader(make_regression(16), batch_size=4, shuffle=True)
        trainer = Trainer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), max_epochs=2, device="cpu", seed=123
        )
        return trainer.fit(train)

    assert run(1) == run(5)


def test_channels_last_model_and_inputs():
    model = nn.Conv2d(3, 4, 3)
    seen = []

    class Spy(Callback):
        def on_batch_start(self, trainer, batch):
            seen.append(batch[0].is_contiguous(memory_format=torch.channels_last))

    x = torch.randn(2, 3, 8, 8)
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        lambda p, t: p.mean(),
        device="cpu",
        channels_last=True,
        callbacks=[Spy()],
    )
    trainer.fit([(x, torch.zeros(2))])
    assert model.weight.is_contiguous(memory_format=torch.channels_last) and seen == [True]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_epochs": 0}, "max_epochs must be a positive integer"),
        ({"accumulate_grad_batches": 0}, "accumulate_grad_batches"),
        ({"grad_clip_norm": -1.0}, "grad_clip_norm must be positive"),
        ({"precision": "int8"}, "unknown precision 'int8'"),
        ({"precision": "16-mixed"}, "needs a CUDA device"),
        ({"scheduler_interval": "week"}, "'epoch' or 'step'"),
        ({"device": "tpu9"}, "unknown device"),
    ],
)
def test_bad_options_have_clear_errors(linear_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(linear_model, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without a GPU")
def test_cuda_without_gpu_is_refused(linear_model):
    with pytest.raises(ValueError, match="no CUDA GPU is available"):
        make_trainer(linear_model, device="cuda")


def test_device_auto_resolves(linear_model):
    trainer = make_trainer(linear_model, device="auto")
    assert trainer.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_callbacks_run_by_order_then_as_given_and_describe_shows_it(linear_model, regression_loaders, capsys):
    from trainer.callbacks import EarlyStopping, ModelCheckpoint, ProgressBar

    seen = []

    class Named(Callback):
        def __init__(self, name, order=0):
            self.name, self.order = name, order

        def on_epoch_end(self, trainer, logs):
            seen.append(self.name)

    late, early = Named("late", order=5), Named("early", order=-5)
    trainer = make_trainer(linear_model, [Named("a"), late, Named("b"), early], max_epochs=1)
    trainer.fit(*regression_loaders)
    assert seen == ["early", "a", "b", "late"]

    trainer.remove_callback(late)
    with pytest.raises(ValueError, match="not among"):
        trainer.remove_callback(late)
    trainer.add_callback(ProgressBar())
    trainer.add_callback(ModelCheckpoint("unused", monitor=None))
    trainer.add_callback(EarlyStopping())
    text = trainer.describe()
    assert capsys.readouterr().out.strip() == text.strip()
    lines = {line.split()[0]: line.split(None, 1)[1] for line in text.splitlines()}
    assert lines["on_epoch_end"] == "EarlyStopping, Named, Named, Named, ProgressBar, ModelCheckpoint"
    # ModelCheckpoint without step checkpoints is idle per batch, so it is not dispatched there.
    assert lines["on_batch_start"] == "-" and lines["on_batch_end"] == "ProgressBar"
    assert lines["on_validation_end"] == "EarlyStopping"
    assert text.splitlines()[0].startswith("on_fit_start") and "    on_batch_end" in text


def test_constructing_under_torchrun_variables_starts_nothing(linear_model, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)  # no rendezvous: starting a group would fail
    trainer = make_trainer(linear_model)
    assert not dist.is_initialized() and trainer.device.type == "cpu"
    assert isinstance(trainer.model, nn.Linear)  # wrapped in DistributedDataParallel by fit only


def test_a_failing_loss_says_so_with_shapes_and_dtypes_and_keeps_its_type():
    # An (N,) output for CrossEntropyLoss with class targets: PyTorch's message alone misleads.
    model = nn.Sequential(nn.Linear(4, 1), nn.Flatten(0))
    data = make_classification(8)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), device="cpu")
    with pytest.raises(RuntimeError) as caught:
        trainer.fit(DataLoader(data, batch_size=4))
    note = caught.value.__notes__[-1]
    assert "loss function CrossEntropyLoss(predictions, targets)" in note
    assert "predictions float32 (4,) and targets int64 (4,)" in note


def test_validate_runs_the_callbacks_the_trainer_has_now(linear_model, regression_loaders):
    calls = []

    class Named(Callback):
        def __init__(self, name):
            self.name = name

        def on_validation_end(self, trainer, logs):
            calls.append(self.name)

    first, second = Named("first"), Named("second")
    trainer = make_trainer(linear_model, [first], max_epochs=1)
    trainer.fit(*regression_loaders)
    trainer.add_callback(second)
    trainer.remove_callback(first)
    calls.clear()
    trainer.validate(regression_loaders[1])
    assert calls == ["second"]


def test_gradient_hooks_see_each_backward_and_the_gradients_each_step_uses(linear_model, regression_loaders):
    events = []

    class Grads(Callback):
        def on_after_backward(self, trainer):
            events.append(("backward", trainer.batch_idx, linear_model.weight.grad is not None))

        def on_before_optimizer_step(self, trainer, optimizer):
            norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in linear_model.parameters()]))
            events.append(("step", trainer.global_step, round(norm.item(), 4) <= 0.5))

    # 3 batches, 2 per step: steps after batch 2 and (a shorter window) after batch 3.
    make_trainer(linear_model, [Grads()], max_epochs=1, accumulate_grad_batches=2, grad_clip_norm=0.5).fit(
        regression_loaders[0]
    )
    assert events == [
        ("backward", 0, True),
        ("backward", 1, True),
        ("step", 0, True),
        ("backward", 2, True),
        ("step", 1, True),
    ]


def test_importing_the_trainer_loads_the_core_only():
    """``import trainer.core`` loads the core alone. What a fit does not always need loads when it is
    used: torchrun's parts, the precision probe and its cache, checkpoints and their state
    (`trainer.state`), the random generators (`trainer.rng`), durations, the loop's errors, the
    callbacks' `RunningLoss`."""
    code = "import sys, trainer.core; print(' '.join(sorted(m for m in sys.modules if m.startswith('trainer.'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    core = (
        "batch",
        "callback",
        "core",
        "epoch_loss",
        "loop",
        "openmp",
        "options",
        "pinning",
        "precision",
        "scheduling",
    )
    assert out.stdout.split() == [f"trainer.{name}" for name in core]


def test_a_fit_without_checkpoints_seed_or_validation_loads_none_of_their_modules():
    code = """
import sys, trainer.core, torch
model = torch.nn.Linear(2, 1)
data = [(torch.ones(4, 2), torch.zeros(4, 1))] * 2
trainer.core.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.MSELoss(), device="cpu").fit(data)
print(" ".join(sorted(m for m in sys.modules if m.startswith("trainer."))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    loaded = set(out.stdout.split())
    assert "trainer.loop" in loaded
    later = ("state", "rng", "errors", "durations", "checkpoint", "running")
    assert not loaded & {f"trainer.{name}" for name in later}
