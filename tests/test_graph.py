"""The model graph from `torch.export`: TensorBoard's GraphDef, read back with TensorBoard's reader.

TorchScript (`torch.jit.trace`, `torch.jit.script`) is patched to raise in these tests, so each
graph they read can only have come from `torch.export` (or `torch.fx`).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from models import FashionCNN, NestedUNet, UNet
from trainer import Trainer
from trainer.callbacks import GraphCallback
from trainer.graph_def import graph_def


@pytest.fixture
def no_torchscript(mocker):
    """TorchScript fails, as it will once PyTorch drops it."""
    gone = RuntimeError("TorchScript is not available")
    return mocker.patch("torch.jit.trace", side_effect=gone), mocker.patch("torch.jit.script", side_effect=gone)


class DictNet(nn.Module):
    """Takes a dict of tensors: an image and a vector of extra features."""

    def __init__(self) -> None:
        super().__init__()
        self.image_encoder = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.extra_encoder = nn.Linear(5, 4)
        self.head = nn.Linear(8, 2)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        image = self.image_encoder(batch["image"]).mean(dim=(2, 3))
        return self.head(torch.cat([image, self.extra_encoder(batch["extra"])], dim=1))


def dict_example() -> dict[str, torch.Tensor]:
    return {"image": torch.randn(2, 3, 8, 8), "extra": torch.randn(2, 5)}


# model, example, a layer (scope), the op of its first node, that node's output shape, the output shapes
CASES = {
    "FashionCNN": (FashionCNN, lambda: torch.randn(2, 1, 28, 28), "conv1", "aten::conv2d", [2, 6, 24, 24], [[2, 10]]),
    "UNet": (
        UNet,
        lambda: torch.randn(2, 3, 32, 32),
        "conv0_0/conv1",
        "aten::conv2d",
        [2, 32, 32, 32],
        [[2, 1, 32, 32]],
    ),
    "NestedUNet": (
        NestedUNet,
        lambda: torch.randn(2, 3, 32, 32),
        "conv0_0/conv1",
        "aten::conv2d",
        [2, 32, 32, 32],
        [[2, 1, 32, 32]],
    ),
    "NestedUNet-deep-supervision": (
        lambda: NestedUNet(deep_supervision=True),
        lambda: torch.randn(2, 3, 32, 32),
        "conv0_0/conv1",
        "aten::conv2d",
        [2, 32, 32, 32],
        [[2, 1, 32, 32]] * 4,
    ),
    "DictNet": (DictNet, dict_example, "extra_encoder", "aten::linear", [2, 4], [[2, 2]]),
}


def log_graph(log_dir, model, example) -> Trainer:
    """What a fit does at its start with a GraphCallback, with every warning an error."""
    callback = GraphCallback(log_dir, example=example)
    trainer = Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), lambda p, t: p.sum() * 0, callbacks=[callback], device="cpu"
    )
    callback.trainer = trainer  # as fit binds its callbacks
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DeprecationWarning, FutureWarning or any other warning
        callback.on_fit_start(trainer)
    trainer.resources.close()  # as fit ends: the shared writer is flushed and closed
    return trainer


def read_graph(log_dir):
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return acc.Graph()


def shapes(node) -> list[list[int]]:
    return [[dim.size for dim in shape.dim] for shape in node.attr["_output_shapes"].list.shape]


@pytest.mark.parametrize("case", list(CASES))
def test_graph_from_export_has_layers_parameters_and_shapes(tmp_path, no_torchscript, case):
    make_model, make_example, layer, op, shape, output_shapes = CASES[case]
    torch.manual_seed(0)
    model = make_model()
    root = type(model).__name__
    log_graph(tmp_path, model, make_example())

    graph = read_graph(tmp_path)
    nodes = {node.name: node for node in graph.node}
    in_layer = [node for name, node in nodes.items() if name.startswith(f"{root}/{layer}/") and node.op == op]
    assert in_layer, f"no {op} node under {root}/{layer}/ in {sorted(nodes)[:20]}"
    first = in_layer[0]
    assert shapes(first) == [shape] and first.attr["dtype"].s == b"float32"
    # the layer's parameters feed its operation, as nodes of their own
    assert f"{root}/{layer}/weight" in first.input and f"{root}/{layer}/bias" in first.input
    weight = nodes[f"{root}/{layer}/weight"]
    parameter = model.get_parameter(layer.replace("/", ".") + ".weight")
    assert weight.op == "Parameter" and shapes(weight) == [list(parameter.shape)]
    inputs = [node for node in graph.node if node.op == "Input"]
    assert inputs and all(node.name.startswith("input/") and shapes(node) for node in inputs)
    outputs = [node for node in graph.node if node.op == "Output"]
    assert [shapes(node)[0] for node in outputs] == output_shapes
    assert all(edge in nodes for node in graph.node for edge in node.input)  # every edge has both ends
    assert not no_torchscript[0].called and not no_torchscript[1].called


def test_batchnorm_buffers_feed_batchnorm_and_stay_untouched(tmp_path, no_torchscript):
    model = NestedUNet()
    model.train()
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    log_graph(tmp_path, model, torch.randn(2, 3, 16, 16) * 5)
    assert model.training
    assert all(torch.equal(buffer, before[name]) for name, buffer in model.named_buffers())
    nodes = {node.name: node for node in read_graph(tmp_path).node}
    (norm,) = [
        node
        for name, node in nodes.items()
        if name.startswith("NestedUNet/conv0_0/bn1/") and node.op == "aten::batch_norm"
    ]
    running_mean = "NestedUNet/conv0_0/bn1/running_mean"
    assert running_mean in norm.input and nodes[running_mean].op == "Buffer"
    assert "NestedUNet/conv0_0/bn1/num_batches_tracked" not in nodes  # unused in eval mode


def test_graph_during_a_fit_from_the_loaders_dict_inputs(tmp_path, no_torchscript):
    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            example = {key: value[0] for key, value in dict_example().items()}
            return {"inputs": example, "targets": torch.tensor(i % 2)}

    torch.manual_seed(0)
    model = DictNet()
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        nn.functional.cross_entropy,
        callbacks=[GraphCallback(tmp_path)],
        max_epochs=1,
        device="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        history = trainer.fit(DataLoader(Pairs(), batch_size=2))
    assert len(history) == 1
    names = [node.name for node in read_graph(tmp_path).node]
    assert "input/batch_image" in names and "input/batch_extra" in names
    assert any(name.startswith("DictNet/image_encoder/0/") for name in names)


def test_fx_when_export_fails(tmp_path, no_torchscript, mocker):
    export = mocker.patch("torch.export.export", side_effect=RuntimeError("export is unavailable"))
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    log_graph(tmp_path, model, torch.randn(2, 1, 8, 8))
    assert export.called
    nodes = {node.name: node for node in read_graph(tmp_path).node}
    (conv,) = [node for name, node in nodes.items() if name.startswith("Sequential/0/") and node.op == "Conv2d"]
    assert "Sequential/0/weight" in conv.input and shapes(conv) == [[2, 2, 6, 6]]
    assert shapes(nodes["Sequential/3/weight"]) == [[3, 72]]


def test_torchscript_only_when_export_and_fx_fail(tmp_path, mocker):
    mocker.patch("torch.export.export", side_effect=RuntimeError("export is unavailable"))
    mocker.patch("torch.fx.symbolic_trace", side_effect=RuntimeError("fx is unavailable"))
    trace = mocker.spy(torch.jit, "trace")
    log_graph(tmp_path, nn.Sequential(nn.Linear(3, 2)), torch.randn(2, 3))  # no warning reaches the user
    assert trace.call_count == 1 and read_graph(tmp_path).node


def test_a_model_nothing_can_graph_warns_once_and_training_goes_on(tmp_path, no_torchscript, capfd):
    class Ungraphable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            if x.sum() > -1e9:  # data-dependent control flow: neither torch.export nor torch.fx follow it
                return self.fc(x)
            return self.fc(-x)

    data = TensorDataset(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    model = Ungraphable()
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        nn.functional.cross_entropy,
        callbacks=[GraphCallback(tmp_path)],
        max_epochs=1,
        device="cpu",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = trainer.fit(DataLoader(data, batch_size=2))
    assert len(history) == 1 and trainer.global_step == 2
    assert [w.category for w in caught] == [RuntimeWarning]
    message = str(caught[0].message)
    assert message.startswith("GraphCallback: could not graph Ungraphable (torch.export: ")
    assert "torch.fx: TraceError" in message
    assert "torch.jit.trace: RuntimeError: TorchScript is not available" in message
    assert message.endswith("; training goes on without the model graph") and "\n" not in message
    out, err = capfd.readouterr()
    assert "def forward" not in out + err and "Error occurs" not in out + err
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert acc.Tags()["graph"] is False


def test_graph_def_restores_training_mode_and_reports_both_failures():
    model = nn.Linear(3, 2)
    assert graph_def(model, torch.randn(2, 3)).node and model.training
    with pytest.raises(RuntimeError, match=r"^torch\.export: .*; torch\.fx: ") as info:
        graph_def(model, torch.randn(2, 4))  # the wrong input size fails both
    assert model.training and "\n" not in str(info.value)
