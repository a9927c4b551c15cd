"""The model graph as TensorBoard's own `GraphDef`, built with `torch.export` (or `torch.fx`).

`graph_def(model, example)` exports ``model(example)`` (non-strict `torch.export.export`, eval
mode, no grad) and walks the exported graph. Where export fails it falls back to
`torch.fx.symbolic_trace` with shapes from `ShapeProp`. Neither uses TorchScript.

Node names follow the module hierarchy (``NestedUNet/conv0_0/conv1/conv2d``), so TensorBoard
folds each layer into a box. Parameters and buffers are nodes of their own
(``NestedUNet/conv0_0/conv1/weight``) that feed their operations; the model's inputs and outputs
are ``input/<name>`` and ``output/output_<i>``. Every node carries ``_output_shapes`` (what the
Graphs tab shows on edges) and ``dtype``; operations say which module ran them (``module``).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from typing import Any

import torch
from tensorboard.compat.proto.attr_value_pb2 import AttrValue
from tensorboard.compat.proto.graph_pb2 import GraphDef
from tensorboard.compat.proto.node_def_pb2 import NodeDef
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.compat.proto.versions_pb2 import VersionDef
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from trainer.precision import evaluating

# The GraphDef producer version TensorBoard expects from PyTorch (as `add_graph` writes it).
PRODUCER = 22


def graph_def(model: nn.Module, example: Any) -> GraphDef:
    """TensorBoard's `GraphDef` of ``model(example)``, from `torch.export` (or, where export
    fails, `torch.fx`); TorchScript is not used.

    `example` is the model's one input, as the Trainer passes it: a tensor, or a dict, list or
    tuple of tensors, on the model's device. The model runs in eval mode with no grad (batch-norm
    statistics are untouched); its training mode is restored afterwards.

    Raises:
        RuntimeError: neither `torch.export` nor `torch.fx` could graph the model; the message
            gives the first line of each one's error.
    """
    errors = []
    with _graphing(model):
        for tool, build in (("torch.export", _exported), ("torch.fx", _symbolic)):
            try:
                graph, stands_for = build(model, example)
                return GraphDef(node=_nodes(graph, model, stands_for), versions=VersionDef(producer=PRODUCER))
            except Exception as exc:  # noqa: BLE001 - try the next tool, report all
                errors.append(f"{tool}: {first_line(exc)}")
                last = exc
    raise RuntimeError("; ".join(errors)) from last


def first_line(exc: BaseException) -> str:
    """``"Type: first line of the message"``: an error in one line."""
    message = str(exc).strip()
    return f"{type(exc).__name__}: {message.splitlines()[0]}" if message else type(exc).__name__


@contextlib.contextmanager
def _graphing(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for `model`, and nothing printed: a failed export prints its partial
    graph and logs warnings to stderr, while the caller reports a failure once, in one line."""
    with evaluating(model), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _exported(model: nn.Module, example: Any) -> tuple[fx.Graph, dict[str, str]]:
    """The exported graph, and which parameter, buffer or constant each placeholder stands for."""
    exported = torch.export.export(model, (example,), strict=False)
    stands_for = {
        spec.arg.name: spec.target
        for spec in exported.graph_signature.input_specs
        if spec.kind.name != "USER_INPUT" and spec.target is not None
    }
    return exported.graph, stands_for


def _symbolic(model: nn.Module, example: Any) -> tuple[fx.Graph, dict[str, str]]:
    """The `torch.fx` graph of the model, with shapes (`ShapeProp` runs it once on `example`)."""
    module = fx.symbolic_trace(model)
    ShapeProp(module).propagate(example)
    return module.graph, {}


def _nodes(graph: fx.Graph, model: nn.Module, stands_for: dict[str, str]) -> list[NodeDef]:
    """TensorBoard nodes for the fx `graph` of `model`."""
    root = type(model).__name__
    kinds = {name: "Parameter" for name, _ in model.named_parameters()}
    kinds.update({name: "Buffer" for name, _ in model.named_buffers()})
    nodes: dict[str, NodeDef] = {}
    names: dict[fx.Node, str] = {}  # fx node -> its TensorBoard name

    def add(name: str, op: str, inputs: list[str], value: Any, module: str = "") -> str:
        unique, n = name, 0
        while unique in nodes:
            n += 1
            unique = f"{name}_{n}"
        nodes[unique] = NodeDef(name=unique, op=op, input=inputs, attr=_attrs(value, module))
        return unique

    def state(qualified: str, value: Any) -> str:
        """The node of a parameter, buffer or constant, made on first use."""
        name = "/".join([root, *qualified.split(".")])
        if name not in nodes:
            add(name, kinds.get(qualified, "Constant"), [], value)
        return name

    for node in graph.nodes:
        value = _value(node)
        if node.op in ("placeholder", "get_attr"):
            qualified = node.target if node.op == "get_attr" else stands_for.get(node.name)
            if qualified is None:
                names[node] = add(f"input/{node.name}", "Input", [], value)
            elif node.users:  # an unused buffer (e.g. num_batches_tracked in eval mode) is left out
                names[node] = state(qualified, value)
        elif node.op == "output":
            for i, source in enumerate(node.all_input_nodes):
                if source in names:
                    add(f"output/output_{i}", "Output", [names[source]], _value(source))
        else:
            path, module_type = _module(node)
            op, own = _operation(node, model)
            inputs = [names[source] for source in node.all_input_nodes if source in names]
            inputs += [state(f"{node.target}.{name}", tensor) for name, tensor in own]
            scope = "/".join([root, *path.split(".")]) if path else root
            names[node] = add(f"{scope}/{node.name}", op, inputs, value, module_type)
    return list(nodes.values())


def _operation(node: fx.Node, model: nn.Module) -> tuple[str, list[tuple[str, Any]]]:
    """The op name of a call `node`, and the parameters and buffers a leaf module keeps inside
    (torch.fx does not trace into a leaf module: its state becomes inputs of its node)."""
    if node.op != "call_module":
        return (str(node.target) if node.op == "call_method" else _op_name(node.target)), []
    leaf = model.get_submodule(str(node.target))
    own = [*leaf.named_parameters(recurse=False), *leaf.named_buffers(recurse=False)]
    return type(leaf).__name__, [(name, tensor) for name, tensor in own if tensor is not None]


def _value(node: fx.Node) -> Any:
    """What a node computes: a fake tensor (export), `TensorMetadata` (fx), or a structure of them."""
    return node.meta.get("val", node.meta.get("tensor_meta"))


def _module(node: fx.Node) -> tuple[str, str]:
    """(dotted path, type name) of the innermost module that ran `node`; ("", "") at the top."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "", ""
    path, module_type = list(stack.values())[-1]
    if isinstance(module_type, type):
        module_type = f"{module_type.__module__}.{module_type.__qualname__}"
    return path, module_type


def _op_name(target: Callable | str) -> str:
    """``aten::conv2d`` for an ATen operator (overload dropped), else the function's name."""
    name = getattr(target, "name", None)
    if callable(name):
        return name().split(".")[0]
    return getattr(target, "__name__", str(target))


def _tensors(value: Any) -> list[Any]:
    """The tensors (or fake tensors, or `TensorMetadata`) in a node's value, flattened."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [tensor for item in value for tensor in _tensors(item)]
    return []


def _attrs(value: Any, module: str) -> dict[str, AttrValue]:
    """``_output_shapes`` and ``dtype`` of a node's outputs (unknown sizes are -1), and its module."""
    tensors = _tensors(value)
    attrs = {}
    if tensors:
        shapes = [
            TensorShapeProto(dim=[TensorShapeProto.Dim(size=d if isinstance(d, int) else -1) for d in t.shape])
            for t in tensors
        ]
        attrs["_output_shapes"] = AttrValue(list=AttrValue.ListValue(shape=shapes))
        dtypes = ", ".join(str(t.dtype).removeprefix("torch.") for t in tensors)
        attrs["dtype"] = AttrValue(s=dtypes.encode())
    if module:
        attrs["module"] = AttrValue(s=module.encode())
    return attrs
