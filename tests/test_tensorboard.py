"""TensorBoard callbacks, checked by reading the event files back with TensorBoard's reader."""

from __future__ import annotations

import errno
import glob
import os
import time
import warnings

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from tests.helpers import TinyNet, TinySegNet, accuracy, fit_visuals, image_data, make, read_logged, seg_data
from trainer import Callback, Trainer, WarmupCosineLR, move_to_device
from trainer.callbacks import (
    GraphCallback,
    ImageGridCallback,
    ModelCheckpoint,
    PredictionFigureCallback,
    TensorBoardCallback,
    TensorBoardWriterCallback,
)
from trainer.callbacks import tensorboard as tb


def event_files(run_dir):
    return glob.glob(os.path.join(run_dir, "**", "events.out.tfevents.*"), recursive=True)


EPOCH_TAGS = {
    "loss": "Loss/training (epoch mean)",
    "val_loss": "Loss/validation",
    "val_acc": "Validation/acc",
    "lr": "learning rate",
}


def test_scalars_equal_history(tmp_path):
    trainer, history = fit_visuals([TensorBoardCallback(tmp_path, every_n_steps=2)])
    acc = read_logged(tmp_path)
    steps_per_epoch = 6
    for key, tag in EPOCH_TAGS.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [steps_per_epoch * (i + 1) for i in range(len(history))]
        assert [e.value for e in events] == pytest.approx([h[key] for h in history], rel=1e-6)
    running = acc.Scalars("Loss/training loss")
    assert [e.step for e in running] == [2, 4, 6, 8, 10, 12]
    assert set(acc.Tags()["scalars"]) == {
        "Loss/training loss",
        "throughput (samples per second)",
        *EPOCH_TAGS.values(),
    }  # nothing else, no one-point values
    assert len(event_files(tmp_path)) == 1


def test_a_schedule_stepped_per_step_logs_its_rate_at_every_log_point(tmp_path):
    """A warm-up over 4 of 12 steps: the learning rate at each log point (after the scheduler's
    step), once per step where a log point ends an epoch; other tags as before."""
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rates = {}

    class Rates(Callback):
        order = 500  # after the TensorBoard callback's point

        def on_batch_end(self, trainer, batch, outputs):
            rates[trainer.global_step] = trainer.optimizer.param_groups[0]["lr"]

    trainer = Trainer(
        model,
        optimizer,
        nn.CrossEntropyLoss(),
        callbacks=[TensorBoardCallback(tmp_path, every_n_steps=2), Rates()],
        max_epochs=2,
        device="cpu",
        scheduler=WarmupCosineLR(optimizer, total_steps=12, warmup_steps=4),
        scheduler_interval="step",
    )
    data = image_data()
    history = trainer.fit(DataLoader(data, batch_size=4))  # 6 steps an epoch
    events = read_logged(tmp_path).Scalars("learning rate")
    assert [e.step for e in events] == [2, 4, 6, 8, 10, 12]
    assert [e.value for e in events] == pytest.approx([rates[step] for step in (2, 4, 6, 8, 10, 12)])
    assert events[0].value == pytest.approx(0.075) and events[-1].value == pytest.approx(history[-1]["lr"])


def test_epoch_tags_of_the_scheme():
    from trainer.callbacks.tags import epoch_tag

    assert [epoch_tag(k) for k in ("loss", "val_loss", "lr", "val_iou", "val_iou_cell", "grad_norm")] == [
        "Loss/training (epoch mean)",
        "Loss/validation",
        "learning rate",
        "Validation/iou",
        "Validation/iou_cell",
        "epoch/grad_norm",
    ]


def class_accuracy(index):
    def metric(pred, target):
        chosen = target == index
        return ((pred.argmax(1) == target) & chosen).float().sum() / chosen.sum().clamp(min=1)

    return metric


def test_default_tags_of_a_user_metric_dict_with_per_class_values(tmp_path):
    metrics = {
        "acc": accuracy,
        "acc_cat": class_accuracy(0),
        "acc_dog_big": class_accuracy(1),
        "recall_at_2": class_accuracy(2),
    }
    callback = TensorBoardCallback(tmp_path, every_n_steps=100, monitor="val_acc", mode="max")
    trainer, history = fit_visuals([callback], metrics=metrics)
    acc = read_logged(tmp_path)
    assert set(acc.Tags()["scalars"]) == {
        "Loss/training (epoch mean)",
        "Loss/validation",
        "learning rate",
        "Validation/acc",
        "Validation/acc/cat",
        "Validation/acc/dog_big",
        "Validation/recall_at_2",
    }
    assert [e.value for e in acc.Scalars("Validation/acc/dog_big")] == pytest.approx(
        [h["val_acc_dog_big"] for h in history], rel=1e-6
    )
    experiment, _ = hparams_data(acc)
    assert [m.name.tag for m in experiment.metric_infos][:3] == [
        "Validation/acc",
        "Loss/validation",
        "Validation/acc/cat",
    ]

    renamed = TensorBoardCallback(tmp_path / "renamed", every_n_steps=100, tags={"val_acc": "Validation/Accuracy"})
    fit_visuals([renamed], metrics=metrics)
    assert {
        "Validation/Accuracy",
        "Validation/Accuracy/cat",
        "Validation/Accuracy/dog_big",
        "Validation/recall_at_2",
    } <= set(read_logged(tmp_path / "renamed").Tags()["scalars"])


def test_running_loss_is_mean_over_window(tmp_path):
    losses = []

    class Keep(Callback):
        def on_batch_end(self, trainer, batch, outputs):
            losses.append(outputs.loss.item())

    fit_visuals([Keep(), TensorBoardCallback(tmp_path, every_n_steps=3)], epochs=1)
    running = read_logged(tmp_path).Scalars("Loss/training loss")
    assert [e.value for e in running] == pytest.approx([sum(losses[:3]) / 3, sum(losses[3:]) / 3], rel=1e-5)


def hparams_data(acc):
    """The run's experiment and session-start info, as TensorBoard's HParams plugin parses them."""
    from tensorboard.plugins.hparams import metadata

    content = acc.PluginTagToContent("hparams")
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    return experiment, start


def test_custom_tags_and_overlay_chart(tmp_path):
    callback = TensorBoardCallback(
        tmp_path,
        every_n_steps=2,
        running_loss_tag="running (loss)",
        tags={"loss": "Loss/train", "val_acc": "Validation/accuracy"},
    )
    fit_visuals([callback])
    acc = read_logged(tmp_path)
    assert set(acc.Tags()["scalars"]) == {
        "running (loss)",
        "Loss/train",
        "Loss/validation",
        "Validation/accuracy",
        "learning rate",
        "throughput (samples per second)",
    }
    raw = acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    (chart,) = layout_pb2.Layout.FromString(raw).category[0].chart
    patterns = list(chart.multiline.tag)  # TensorBoard reads them as regular expressions
    assert patterns == [r"^running\ \(loss\)$", r"^Loss/train$", r"^Loss/validation$"]
    import re

    assert [tag for tag in sorted(acc.Tags()["scalars"]) if any(re.search(p, tag) for p in patterns)] == [
        "Loss/train",
        "Loss/validation",
        "running (loss)",
    ]


def test_hparams_main_options_first_with_their_types_and_no_one_point_scalars(tmp_path):
    from tensorboard.plugins.hparams import api_pb2

    hparams = {
        "seed": 3,
        "data": None,
        "deep_supervision": False,
        "arch": "NestedUNet",
        "classes": ["a", "b"],
        "epochs": 2,
        "lr": 0.05,
        "optimizer": "adam",
        "model": TinyNet,
        "batch_size": 4,
        "precision": "32",
    }
    callback = TensorBoardCallback(tmp_path, every_n_steps=2, hparams=hparams, monitor="val_acc", mode="max")
    _, history = fit_visuals([callback])
    acc = read_logged(tmp_path)
    experiment, start = hparams_data(acc)
    shown = [info.display_name for info in experiment.hparam_infos]
    # TensorBoard orders them by stored name and shows the first five by default
    assert sorted(experiment.hparam_infos, key=lambda info: info.name) == list(experiment.hparam_infos)
    assert shown == [
        "lr",
        "epochs",
        "batch_size",
        "precision",
        "arch",
        "optimizer",
        "classes",
        "deep_supervision",
        "model",
        "seed",
    ]  # main options first, then by name; None left out
    types = {info.display_name: api_pb2.DataType.Name(info.type) for info in experiment.hparam_infos}
    assert types["deep_supervision"] == "DATA_TYPE_BOOL" and types["lr"] == "DATA_TYPE_FLOAT64"
    assert types["arch"] == types["classes"] == types["model"] == "DATA_TYPE_STRING"
    values = {info.display_name: start.hparams[info.name] for info in experiment.hparam_infos}
    assert values["deep_supervision"].WhichOneof("kind") == "bool_value" and not values["deep_supervision"].bool_value
    assert values["classes"].string_value == "a, b" and values["epochs"].string_value == "2"  # not 2.0000
    assert values["lr"].number_value == 0.05
    # The metrics are the last values of the epoch curves: the monitored one first.
    metrics = [info.name.tag for info in experiment.metric_infos]
    assert metrics == ["Validation/acc", "Loss/validation", "Loss/training (epoch mean)"]
    assert acc.Scalars("Validation/acc")[-1].value == pytest.approx(history[-1]["val_acc"])
    assert not [tag for tag in acc.Tags()["scalars"] if tag.startswith("hparams/") or len(acc.Scalars(tag)) < 2]
    assert len(acc.Tensors("_hparams_/session_start_info")) == 1


def test_hparams_metrics_include_the_validation_logs_a_callback_adds(tmp_path):
    """A callback that adds its own validation logs (as ConfusionMatrixCallback adds val_iou for
    label maps) and lists them in `log_keys` gets them into the HParams tab's metrics."""

    class Coverage(Callback):
        order = -20  # before the loggers: they see the value
        log_keys = ["val_coverage"]

        def on_validation_end(self, trainer, logs):
            logs["val_coverage"] = 0.5

    fit_visuals([Coverage(), TensorBoardCallback(tmp_path, every_n_steps=2)])
    experiment, _ = hparams_data(read_logged(tmp_path))
    assert "Validation/coverage" in [info.name.tag for info in experiment.metric_infos]


def test_default_hparams_are_the_main_options(tmp_path):
    fit_visuals([TensorBoardCallback(tmp_path)])
    experiment, start = hparams_data(read_logged(tmp_path))
    # The five TensorBoard shows by default, precision among them; integers as text (2, not 2.0000).
    assert [info.display_name for info in experiment.hparam_infos] == [
        "lr",
        "epochs",
        "batch_size",
        "precision",
        "optimizer",
    ]
    assert {info.display_name: start.hparams[info.name].WhichOneof("kind") for info in experiment.hparam_infos} == {
        "lr": "number_value",
        "epochs": "string_value",
        "batch_size": "string_value",
        "optimizer": "string_value",
        "precision": "string_value",
    }


def test_all_callbacks_share_one_event_stream(tmp_path, mocker):
    opened = mocker.spy(tb, "open_writer")
    closed = mocker.spy(SummaryWriter, "close")
    callbacks = [
        TensorBoardCallback(tmp_path),
        ImageGridCallback(tmp_path),
        GraphCallback(tmp_path),
        PredictionFigureCallback(tmp_path, classes=["a", "b", "c"]),
    ]
    trainer, _ = fit_visuals(callbacks)
    assert len(event_files(tmp_path)) == 1
    assert opened.call_count == 1 and closed.call_count == 1  # one writer, closed at the end of fit
    assert ("SummaryWriter", os.path.realpath(tmp_path)) not in trainer.resources
    tags = read_logged(tmp_path).Tags()
    assert "images" in tags["images"] and "predictions vs. actuals" in tags["images"] and tags["graph"]


def test_writer_closed_and_flushed_after_exception(tmp_path, mocker):
    class Boom(Callback):
        def on_epoch_end(self, trainer, logs):
            if trainer.epoch == 1:
                raise RuntimeError("stop here")

    closed = mocker.spy(SummaryWriter, "close")
    with pytest.raises(RuntimeError):
        fit_visuals([TensorBoardCallback(tmp_path), ImageGridCallback(tmp_path), Boom()], epochs=3)
    assert closed.call_count == 1
    assert [e.step for e in read_logged(tmp_path).Scalars("Loss/training (epoch mean)")] == [6, 12]


def test_writer_flushed_every_epoch_end(tmp_path):
    seen = []

    class ReadBack(Callback):  # between epochs, what an outside reader (TensorBoard) finds on disk
        def on_epoch_start(self, trainer):
            if trainer.epoch:
                seen.append(len(read_logged(tmp_path).Scalars("Loss/training (epoch mean)")))

    fit_visuals([TensorBoardCallback(tmp_path), ReadBack()], epochs=3)
    assert seen == [1, 2]


def test_graph_has_layer_names_for_list_outputs_and_no_deprecation_noise(tmp_path, recwarn):
    fit_visuals(
        [GraphCallback(tmp_path)],
        model=TinySegNet(),
        data=seg_data(),
        loss=lambda p, t: sum(nn.functional.binary_cross_entropy_with_logits(o, t) for o in p),
        metrics={},
        epochs=1,
    )
    assert not [w for w in recwarn if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    graph = read_logged(tmp_path).Graph()
    names = " ".join(node.name for node in graph.node)
    assert "encoder" in names and "head" in names and "aux" in names


def test_graph_keeps_batchnorm_statistics(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2), nn.Conv2d(2, 1, 1))
    callback = GraphCallback(tmp_path, example=torch.randn(2, 3, 16, 16) * 5)
    torch.manual_seed(0)
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        lambda p, t: p.mean() * 0,
        callbacks=[callback],
        device="cpu",
    )
    callback.trainer = trainer  # as fit binds its callbacks
    callback.on_fit_start(trainer)
    trainer.resources.close()
    assert torch.equal(model[1].running_mean, torch.zeros(2)) and model.training


def test_graph_failure_warns_once_and_training_goes_on(tmp_path, capsys):
    class Untraceable(TinyNet):
        def forward(self, x):
            if torch.jit.is_tracing():
                raise RuntimeError("cannot trace this")
            if x.sum() > -1e9:  # data-dependent control flow: neither torch.export nor torch.fx follow it
                return super().forward(x)
            return super().forward(-x)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, history = fit_visuals([GraphCallback(tmp_path)], model=Untraceable(), epochs=1)
    ours = [w for w in caught if "GraphCallback" in str(w.message)]
    assert len(ours) == 1 and "cannot trace this" in str(ours[0].message)
    assert len(history) == 1 and "Error occurs" not in capsys.readouterr().out


def test_visual_callbacks_do_not_change_training(tmp_path):
    plain_trainer, plain = fit_visuals([], epochs=2)
    shuffled = DataLoader(image_data(), batch_size=4, shuffle=True)

    def run(callbacks):
        torch.manual_seed(0)
        model = TinyNet()
        trainer = Trainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.05),
            nn.CrossEntropyLoss(),
            callbacks=callbacks,
            max_epochs=2,
            device="cpu",
            seed=1,
        )
        return trainer.fit(shuffled, shuffled)

    base = run([])
    visual = run(
        [ImageGridCallback(tmp_path / "a"), GraphCallback(tmp_path / "a"), PredictionFigureCallback(tmp_path / "a")]
    )
    assert base == visual


def test_contract_with_mocked_writer(tmp_path, mocker):
    """Which tags at which steps, how often, and nothing between log points."""
    writer = mocker.MagicMock()
    mocker.patch.object(tb, "SummaryWriter", return_value=writer)
    calls_per_batch = []

    class Watch(Callback):
        def on_batch_end(self, trainer, batch, outputs):
            calls_per_batch.append((trainer.global_step, len(writer.method_calls)))

    fit_visuals([TensorBoardCallback(tmp_path, every_n_steps=4), Watch()], epochs=1)
    scalar_calls = [c.args for c in writer.add_scalar.call_args_list]
    points = ("Loss/training loss", "throughput (samples per second)")
    assert [(tag, step) for tag, _, step in scalar_calls if tag in points] == [(tag, 4) for tag in points]
    epoch_tags = [(tag, step) for tag, _, step in scalar_calls if tag not in points]
    assert epoch_tags == [(tag, 6) for tag in EPOCH_TAGS.values()]
    # Writer activity changes only at the log point (step 4), not on other batches.
    counts = dict(calls_per_batch)
    assert counts[1] == counts[2] == counts[3] and counts[4] > counts[3] and counts[5] == counts[4]
    writer.flush.assert_called()
    writer.close.assert_called_once()


def test_unwritable_log_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="cannot create the TensorBoard log directory"):
        fit_visuals([TensorBoardCallback(blocker / "run")])


@pytest.mark.parametrize(
    "factory",
    [
        lambda p: TensorBoardCallback(p, every_n_steps=0),
        lambda p: ImageGridCallback(p, every_n_epochs=0),
        lambda p: PredictionFigureCallback(p, kind="regression"),
        lambda p: PredictionFigureCallback(p, every_n_steps=-2),
    ],
)
def test_bad_options(tmp_path, factory):
    with pytest.raises(ValueError):
        factory(tmp_path)


def test_pr_curves_per_class_at_fit_end(tmp_path):
    from trainer.callbacks import PRCurveCallback

    trainer, _ = fit_visuals([PRCurveCallback(tmp_path, classes=["a", "b", "c"])])
    acc = read_logged(tmp_path)
    assert set(acc.PluginTagToContent("pr_curves")) == {"pr/0 a", "pr/1 b", "pr/2 c"}
    events = acc.Tensors("pr/1 b")
    assert [e.step for e in events] == [trainer.global_step]
    counts = torch.tensor(events[0].tensor_proto.float_val).reshape(6, -1)
    true_positives_at_zero, false_positives_at_zero = counts[0, 0], counts[1, 0]
    labels = image_data().tensors[1]
    assert true_positives_at_zero == (labels == 1).sum() and false_positives_at_zero == (labels != 1).sum()


def test_pr_curve_tags_sort_in_class_order():
    from trainer.callbacks.tags import pr_curve_tags

    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    tags = pr_curve_tags(classes)
    assert tags[0] == "pr/0 T-shirt/top" and tags[-1] == "pr/9 Ankle boot" and sorted(tags) == tags
    eleven = pr_curve_tags([*classes, "Hat"])
    assert eleven[0] == "pr/00 T-shirt/top" and eleven[-1] == "pr/10 Hat" and sorted(eleven) == eleven


def test_pr_curves_skipped_after_exception(tmp_path, mocker):
    from trainer.callbacks import PRCurveCallback

    callback = PRCurveCallback(tmp_path, classes=["a", "b", "c"])
    predict = mocker.spy(PRCurveCallback, "predict")

    class Boom(Callback):
        def on_epoch_end(self, trainer, logs):
            raise RuntimeError("x")

    with pytest.raises(RuntimeError):
        fit_visuals([callback, Boom()])
    predict.assert_not_called()


def test_embedding_projector_files(tmp_path):
    from trainer.callbacks import EmbeddingCallback

    images = torch.randint(0, 256, (30, 8, 8), dtype=torch.uint8)
    labels = torch.arange(30) % 3
    fit_visuals([EmbeddingCallback(tmp_path, images, labels, ["a", "b", "c"], num_samples=10)], epochs=1)
    config = (tmp_path / "projector_config.pbtxt").read_text()
    assert "metadata.tsv" in config and "sprite.png" in config
    (metadata,) = list(tmp_path.glob("*/images/metadata.tsv")) or list(tmp_path.glob("*/*/metadata.tsv"))
    rows = metadata.read_text().split()
    assert len(rows) == 10 and set(rows) <= {"a", "b", "c"}


def test_a_full_disk_under_the_event_writer_raises_oserror_in_the_callers_thread_only(small_disk, capfd):
    """The writer thread's ENOSPC comes back as an OSError from the next add/flush/close, the
    thread's own traceback is not printed, and the file still reads back up to its last whole record."""
    folder = small_disk.mount("256k")
    writer = tb.open_writer(folder / "run")
    with pytest.raises(OSError) as full:
        for step in range(100_000):
            writer.add_text("notes", "x" * 1000, step)
            writer.add_scalar("value", float(step), step)
        writer.flush()
    assert full.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        writer.close()
    assert "Exception in thread" not in capfd.readouterr().err
    events = EventAccumulator(str(folder / "run"))
    events.Reload()
    steps = [event.step for event in events.Scalars("value")]
    assert steps == list(range(len(steps))) and len(steps) > 10


def test_a_resumed_stream_is_read_after_the_interrupted_one_within_the_same_second(tmp_path, monkeypatch):
    """TensorBoard reads a folder's event files in name order, and names made in the same second
    compare by process id and counter as text: a resumed run's writer still makes the file read
    last, so its restart marker drops what the interrupted run wrote after its checkpoint."""
    now = [int(time.time()) + 0.25]  # a clock that moves only when slept on
    monkeypatch.setattr(time, "time", lambda: now[0])
    monkeypatch.setattr(time, "sleep", lambda seconds: now.__setitem__(0, now[0] + seconds))
    run = tmp_path / "run"
    interrupted = tb.open_writer(run, purge_step=0)
    for step in range(1, 11):
        interrupted.add_scalar("loss", float(step), step)
    interrupted.close()
    [written] = event_files(run)
    # As if written in this second by another process whose id sorts after this one's.
    os.rename(written, written.rsplit(".", 2)[0] + ".99999999.0")
    resumed = tb.open_writer(run, purge_step=6)
    for step in range(6, 9):
        resumed.add_scalar("loss", 100.0 + step, step)
    resumed.close()
    files = sorted(event_files(run))
    assert len(files) == 2 and not files[-1].endswith(".99999999.0")  # made in the next second, read last
    points = [(event.step, event.value) for event in read_logged(run).Scalars("loss")]
    assert points == [(step, float(step)) for step in range(1, 6)] + [(step, 100.0 + step) for step in range(6, 9)]


# ------------------------------------------------------------------------------------------ throughput
def test_samples_per_second_at_each_log_point_without_a_device_sync(tmp_path, mocker):
    syncs, item = [], torch.Tensor.item

    def counted(self):
        syncs.append(1)
        return item(self)

    def counted_fit(callbacks):
        trainer, train, val = make(callbacks, epochs=2)
        mocker.patch.object(torch.Tensor, "item", counted)
        syncs.clear()
        started = time.perf_counter()
        trainer.fit(train, val)
        mocker.stopall()
        return len(syncs), time.perf_counter() - started

    without, _ = counted_fit([])
    with_tensorboard, elapsed = counted_fit([TensorBoardCallback(tmp_path, every_n_steps=5)])
    assert with_tensorboard == without + 4  # one per running-loss point: none for the throughput
    points = read_logged(tmp_path).Scalars("throughput (samples per second)")
    assert [e.step for e in points] == [5, 10, 15, 20]
    assert all(20 / elapsed < e.value < 1e9 for e in points)  # 20 samples per point, all within `elapsed`


def test_validate_after_a_resumed_fit_keeps_the_runs_curves_and_closes_its_writer(tmp_path):
    """`validate()` after a fit that resumed at step 10 and trained to step 30: what the callbacks
    write there goes through a writer that is flushed and closed when validate returns, and that
    writer drops none of the run's points after step 10 (it used to open with the resumed fit's
    purge step, so TensorBoard dropped steps 11-30)."""

    class ValidationMarker(TensorBoardWriterCallback):
        def on_validation_end(self, trainer, logs):
            self.writer.add_scalar("marker/validate", logs["val_loss"], trainer.global_step)

    first, train, val = make([ModelCheckpoint(tmp_path / "ckpt"), TensorBoardCallback(tmp_path / "tb")], epochs=1)
    first.fit(train, val)
    callbacks = [
        ModelCheckpoint(tmp_path / "ckpt"),
        TensorBoardCallback(tmp_path / "tb"),
        ValidationMarker(tmp_path / "tb"),
    ]
    trainer, train, val = make(callbacks, epochs=3)
    trainer.fit(train, val, resume_from=tmp_path / "ckpt" / "last.pt")
    assert trainer.start_step == 10 and trainer.global_step == 30
    trainer.validate(val)

    logged = read_logged(tmp_path / "tb")  # read while the trainer is alive: the writer was closed
    assert [e.step for e in logged.Scalars("Loss/training (epoch mean)")] == [10, 20, 30]
    assert [e.step for e in logged.Scalars("marker/validate")] == [20, 30, 30]  # the fit's two, validate's one
    assert ("SummaryWriter", os.path.realpath(tmp_path / "tb")) not in trainer.resources


def test_the_fixed_batch_is_copied_to_the_host_before_it_is_read(mocker):
    """The visuals' fixed batch comes to the CPU with a blocking copy (from a GPU, a non-blocking
    one returns before the data arrive and the images would be read half-filled), while batches
    going to a GPU are still copied asynchronously."""
    original, copies = torch.Tensor.to, []

    def to(tensor, *args, **kwargs):
        copies.append((args[0], kwargs.get("non_blocking")))
        return original(tensor, *args, **kwargs) if args[0].type == "cpu" else tensor  # no GPU here

    trainer, _, val = make()
    mocker.patch.object(torch.Tensor, "to", to)
    tb.take_batch(trainer, next(iter(val)), 2)
    move_to_device(next(iter(val)), torch.device("cuda", 0))
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert copies == [(cpu, False), (cpu, False), (cuda, True), (cuda, True)]
