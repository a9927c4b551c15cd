"""How to rebuild a model: its class and constructor arguments, recorded in checkpoints.

`record_model` turns an `nn.Module` into a spec of plain values,
``{"class": "models.unet.UNet", "args": [], "kwargs": {"num_classes": 1, "input_channels": 3}}``,
that `torch.load(weights_only=True)` reads back. The arguments are read from the instance: each
parameter of the class's ``__init__`` from the attribute of the same name (``self.num_classes``),
which is what PyTorch's own layers and this project's models keep. A ``bias`` parameter whose
attribute is the bias tensor records whether there is one; ``device`` and ``dtype`` are left out
(the saved weights decide them). An `nn.Sequential`'s layers, and module-valued arguments, are
recorded as specs of their own. Arguments that cannot be read this way are given explicitly
(``model_args``). The record is checked at once by building the class again, on the ``meta``
device (no memory, no random draws), and comparing its weights' names and shapes.

`rebuild_model` builds a model from a spec, only from classes the caller allows: it never
imports a module because a file names it (unless the caller trusts the file). A spec from a file
is checked first (`check_spec`): its nesting depth and every integer it holds are bounded
(`MAX_NESTING`, `MAX_SIZE`), so a hostile file can neither exhaust the stack nor name absurd sizes;
`trainer.trained_model.load_model` builds it on the ``meta`` device and compares it with the
file's weights before any memory is allocated.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import reprlib
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

#: The key that marks a module-valued argument inside a spec.
MODULE_KEY = "__module_spec__"
#: The project's own models, which `rebuild_model` rebuilds without being told.
PROJECT_MODELS = ("models.unet.UNet", "models.nested_unet.NestedUNet", "models.cnn.FashionCNN")
#: The deepest nesting of lists, dicts and module specs a spec may have (a deeper one is refused).
MAX_NESTING = 100
#: The largest integer (in absolute value) a spec may hold: widths, features, numbers of classes.
MAX_SIZE = 1 << 20
#: Constructor parameters that place weights rather than shape them: not recorded.
_PLACEMENT = ("device", "dtype")
_PLAIN = (bool, int, float, str, type(None))
_FIX = (
    "pass the keyword arguments that rebuild it: ModelCheckpoint(..., model_args={...}), or "
    "ModelCheckpoint(..., describe_model=False) for checkpoints that resume but do not rebuild the model"
)


class ModelSpecError(ValueError):
    """A model's constructor arguments cannot be recorded, or a spec cannot be rebuilt."""


def class_path(cls: type) -> str:
    """``module.QualifiedName`` of `cls`, as specs name classes.

    Args:
        cls: the class.
    """
    return f"{cls.__module__}.{cls.__qualname__}"


def is_plain(value: Any) -> bool:
    """Whether `value` is plain data that ``weights_only`` loading reads back: numbers, strings,
    bools, None, and lists, tuples and str-keyed dicts of them.

    Args:
        value: the value.
    """
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


def _value(value: Any, owner: str, name: str) -> Any:
    """`value` as a spec holds it: plain values as they are, modules as nested specs."""
    if isinstance(value, nn.Module):
        return {MODULE_KEY: _record(value, None)}
    if not is_plain(value):
        raise ModelSpecError(
            f"cannot record the argument {name!r} of {owner}: its value is a "
            f"{type(value).__name__}, not a number, string, bool, None, list or dict; {_FIX}"
        )
    return value


def _record(model: nn.Module, explicit: Mapping[str, Any] | None) -> dict[str, Any]:
    cls = type(model)
    owner = class_path(cls)
    if explicit is not None:
        return {
            "class": owner,
            "args": [],
            "kwargs": {str(name): _value(value, owner, str(name)) for name, value in explicit.items()},
        }
    if isinstance(model, nn.Sequential) and all(name == str(i) for i, name in enumerate(model._modules)):
        return {"class": owner, "args": [_value(m, owner, str(i)) for i, m in enumerate(model)], "kwargs": {}}
    args, kwargs = [], {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or name in _PLACEMENT:
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ModelSpecError(
                f"cannot record the arguments of {owner}: its __init__ takes "
                f"{'*' if param.kind is param.VAR_POSITIONAL else '**'}{name}, which the instance "
                f"does not keep; {_FIX}"
            )
        if not hasattr(model, name):
            raise ModelSpecError(
                f"cannot record the argument {name!r} of {owner}: the model has no attribute "
                f"{name!r} holding it; {_FIX}"
            )
        value = getattr(model, name)
        if name == "bias" and isinstance(param.default, bool) and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None  # PyTorch layers keep the bias tensor (or None) under the flag's name
        value = _value(value, owner, name)
        if param.kind is param.POSITIONAL_ONLY:
            args.append(value)
        else:
            kwargs[name] = value
    return {"class": owner, "args": args, "kwargs": kwargs}


def record_model(model: nn.Module, model_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The spec that rebuilds `model`: its class's import path and constructor arguments.

    Raises `ModelSpecError` naming the class and the argument when an argument cannot be read
    from the instance (no same-named attribute, ``*args``/``**kwargs``, a value that is not
    plain data), when the record is one a checkpoint may not hold (`check_spec`: nested too deep,
    a size above `MAX_SIZE`), or when building the class again from the record gives other
    weights (names or shapes) than `model` has: pass `model_args` then.

    Args:
        model: the network (unwrapped from DistributedDataParallel).
        model_args: the keyword arguments that rebuild it, ``type(model)(**model_args)``,
            instead of reading them from the instance.
    """
    spec = _record(model, model_args)
    try:
        check_spec(spec, f"the record of {class_path(type(model))}")
    except ModelSpecError as exc:
        raise ModelSpecError(f"{exc}; {_FIX}") from None
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            rebuilt = _build(spec, lambda path: _class_of(path, model))
    except Exception as exc:  # noqa: BLE001 - whatever the class raises, the record does not rebuild it
        raise ModelSpecError(
            f"the recorded arguments do not rebuild {spec['class']}: {_call(spec)} raised "
            f"{type(exc).__name__}: {exc}; {_FIX}"
        ) from exc
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if got != expected:
        differ = sorted(set(got) ^ set(expected)) or [k for k in expected if got[k] != expected[k]]
        raise ModelSpecError(
            f"the recorded arguments do not rebuild {spec['class']}: {_call(spec)} has other "
            f"weights (e.g. {differ[0]}); {_FIX}"
        )
    return spec


def _class_of(path: str, model: nn.Module) -> type:
    """The class of `model` or of one of its submodules named `path` (while recording)."""
    for module in model.modules():
        if class_path(type(module)) == path:
            return type(module)
    raise ModelSpecError(f"no module of class {path} in the model")


class _Shortened(reprlib.Repr):
    """`reprlib.Repr` that also shortens integers: Python refuses to write one of more than 4300
    digits (a `ValueError`), so a huge one is shown by its size."""

    def repr_int(self, x: int, level: int) -> str:
        return repr(x) if x.bit_length() <= 64 else f"<an integer of {x.bit_length()} bits>"


def short_repr(level: int, items: int, text: int) -> reprlib.Repr:
    """A `reprlib.Repr` that shows at most `level` levels of nesting, `items` items of each list,
    tuple or dict and `text` characters of each string or other value (an integer of more than
    64 bits by its size): values a file gives, for messages, without building the whole text of a
    huge or deep value.

    Args:
        level: levels of nesting shown.
        items: items shown of each container.
        text: characters shown of each string and other value.
    """
    shown = _Shortened()
    shown.maxlevel = level
    shown.maxlist = shown.maxtuple = shown.maxdict = shown.maxset = items
    shown.maxstring = shown.maxother = text
    return shown


_SHORT = short_repr(level=3, items=6, text=60)


def _call(spec: Mapping[str, Any]) -> str:
    """``Class(arg, name=value)`` as text, for messages (long or deep values shortened)."""
    args = [_SHORT.repr(a) for a in spec["args"][:8]] + [
        f"{k}={_SHORT.repr(v)}" for k, v in list(spec["kwargs"].items())[:8]
    ]
    text = f"{_short_name(spec['class'])}({', '.join(args)})"
    return text if len(text) <= 200 else text[:197] + "..."


def _short_name(path: str) -> str:
    """The class name of a class path, shortened for messages."""
    name = path.rsplit(".", 1)[-1]
    return name if len(name) <= 60 else name[:57] + "..."


def _unwrap(value: Any, resolve, device: str | torch.device | None = None) -> Any:
    if isinstance(value, dict) and set(value) == {MODULE_KEY}:
        return _build(value[MODULE_KEY], resolve, device)
    return value


def _build(spec: Mapping[str, Any], resolve, device: str | torch.device | None = None) -> nn.Module:
    cls = resolve(spec["class"])  # imports (if any) outside the device context: module-level tensors stay real
    args = [_unwrap(a, resolve, device) for a in spec["args"]]
    kwargs = {k: _unwrap(v, resolve, device) for k, v in spec["kwargs"].items()}
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return cls(*args, **kwargs)


def spec_classes(spec: Mapping[str, Any]) -> list[str]:
    """Every class a spec names: its own and its nested modules', outermost first.

    Args:
        spec: a spec from `record_model`.
    """
    names = [spec["class"]]
    for value in [*spec["args"], *spec["kwargs"].values()]:
        if isinstance(value, dict) and set(value) == {MODULE_KEY}:
            names += spec_classes(value[MODULE_KEY])
    return names


def _torch_layer(path: str) -> type | None:
    """The class of PyTorch's own layers (``torch.nn.modules...``) that `path` names, looked up
    in the already imported `torch.nn`; None for any other path."""
    if not path.startswith("torch.nn.modules."):
        return None
    cls = getattr(nn, path.rsplit(".", 1)[-1], None)
    return cls if isinstance(cls, type) and issubclass(cls, nn.Module) and class_path(cls) == path else None


def check_spec(spec: Any, source: str = "the checkpoint") -> None:
    """Refuse a spec that is not one `record_model` could have written, before anything is built
    from it: a `ModelSpecError` of one line naming `source` and what is wrong.

    Refused: a spec that is not ``{"class": str, "args": list, "kwargs": dict}`` (also any nested
    module spec), a value that is not plain data, lists, dicts and module specs nested more than
    `MAX_NESTING` deep, and an integer above `MAX_SIZE` in absolute value (a width, a number of
    features or classes no model here has). Nothing in `spec` is printed in full.

    Args:
        spec: a checkpoint's ``"model_spec"``.
        source: what the spec comes from, for messages (the checkpoint's path).
    """
    _check_module(spec, 0, source)


def _check_value(value: Any, depth: int, owner: str, name: str, source: str) -> None:
    """`check_spec` of one argument `name` of `owner`."""
    if depth > MAX_NESTING:
        raise ModelSpecError(
            f"{source} holds a model_spec nested more than {MAX_NESTING} levels deep (lists, dicts "
            f"and module specs, at the argument {name!r} of {owner}); no model records such a spec"
        )
    if value is None or isinstance(value, (bool, float, str)):
        return
    if isinstance(value, int):
        if abs(value) > MAX_SIZE:
            raise ModelSpecError(
                f"{source} holds a model_spec whose argument {name!r} of {owner} is {_SHORT.repr(value)}, above "
                f"{MAX_SIZE}, the largest size (width, features, classes) a checkpoint may name"
            )
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_value(item, depth + 1, owner, name, source)
        return
    if isinstance(value, dict) and set(value) == {MODULE_KEY}:
        _check_module(value[MODULE_KEY], depth + 1, source)
        return
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        for item in value.values():
            _check_value(item, depth + 1, owner, name, source)
        return
    raise ModelSpecError(
        f"{source} holds a damaged model_spec: the argument {name!r} of {owner} is a "
        f"{type(value).__name__}, not a number, string, bool, None, list, dict or module spec"
    )


def _check_module(value: Any, depth: int, source: str) -> None:
    """`check_spec` of one module spec."""
    if not (
        isinstance(value, Mapping)
        and isinstance(value.get("class"), str)
        and len(value["class"]) <= 300
        and isinstance(value.get("args"), list)
        and isinstance(value.get("kwargs"), dict)
    ):
        raise ModelSpecError(
            f"{source} holds a damaged model_spec: a {type(value).__name__} where a module spec "
            '({"class": str, "args": list, "kwargs": dict}) belongs'
        )
    owner = _short_name(value["class"])
    for index, arg in enumerate(value["args"]):
        _check_value(arg, depth + 1, owner, str(index), source)
    for key, arg in value["kwargs"].items():
        if not isinstance(key, str) or len(key) > 100:
            raise ModelSpecError(
                f"{source} holds a damaged model_spec: the keyword {_SHORT.repr(key)} of {owner} is not a name"
            )
        _check_value(arg, depth + 1, owner, key, source)


@contextlib.contextmanager
def registration_limit(limit: int, source: str = "the checkpoint") -> Iterator[None]:
    """Within the block, stop building a model (`ModelSpecError`) once this thread's module
    constructors have registered more than `limit` parameters, buffers and submodules together.

    Building on the ``meta`` device allocates no tensor memory, but a constructor that loops over
    a count it is given (layers of an `nn.LSTM`, of an `nn.Transformer`) still creates that many
    Python objects; a file that holds N weights bounds what its model may register.

    Args:
        limit: the most registrations allowed.
        source: what the spec comes from, for messages.
    """
    from torch.nn.modules import module as module_hooks

    thread, count = threading.get_ident(), [0]

    def hook(module: nn.Module, name: str, value: Any) -> None:
        if value is not None and threading.get_ident() == thread:
            count[0] += 1
            if count[0] > limit:
                raise ModelSpecError(
                    f"{source}: its model_spec builds a model with more than {limit} parameters, buffers "
                    "and modules, far more than the file holds weights for"
                )

    handles = [
        module_hooks.register_module_parameter_registration_hook(hook),
        module_hooks.register_module_buffer_registration_hook(hook),
        module_hooks.register_module_module_registration_hook(hook),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def rebuild_model(
    spec: Mapping[str, Any],
    allowed: Iterable[type] = (),
    trusted: bool = False,
    source: str = "the checkpoint",
    device: str | torch.device | None = None,
) -> nn.Module:
    """A new, untrained instance of the model `spec` describes.

    The spec is checked first (`check_spec`). A class is built only when it is allowed: PyTorch's
    own layers, the project's models (`PROJECT_MODELS`), the classes in `allowed`, or, with
    `trusted`, any class, imported from the module the spec names. Without `trusted`, no module
    is ever imported because the spec names it: the allowed classes are compared by their import
    path. Any other class is a `ModelSpecError` saying which class the spec names and how to
    allow it.

    Args:
        spec: a spec from `record_model` (a checkpoint's ``"model_spec"``).
        allowed: further model classes the caller allows, e.g. ``[MyNet]``.
        trusted: the caller trusts the file: import the module the spec names. Importing runs
            that module's code; use it only for files you wrote.
        source: what the spec comes from, for messages (the checkpoint's path).
        device: where the constructors put the model's tensors (default: torch's default device);
            ``"meta"`` allocates no memory and draws no random numbers (what `load_model` builds
            first, to compare with the file's weights).
    """
    check_spec(spec, source)
    extra = {class_path(cls): cls for cls in allowed}

    def resolve(path: str) -> type:
        cls = _torch_layer(path) or extra.get(path)
        if cls is None and (path in PROJECT_MODELS or trusted):
            module, _, name = path.rpartition(".")
            try:
                cls = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError) as exc:
                raise ModelSpecError(
                    f"{source} names the model class {path}, which cannot be imported here: {exc}"
                ) from exc
        if cls is None:
            raise ModelSpecError(
                f"{source} names the model class {path} ({_call(spec)}), which is not allowed to be rebuilt: "
                f"pass it, e.g. load_model(path, allowed=[{path.rsplit('.', 1)[-1]}]) with the class imported from "
                f"your code, or trusted=True if you wrote the file yourself (that imports {module_of(path)!r})"
            )
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ModelSpecError(f"{source} names {path}, which is not an nn.Module class")
        return cls

    try:
        return _build(spec, resolve, device)
    except ModelSpecError:
        raise
    except Exception as exc:  # noqa: BLE001 - the class refused the recorded arguments
        reason = " ".join(str(exc).split())
        reason = reason if len(reason) <= 300 else reason[:297] + "..."
        raise ModelSpecError(f"{source}: {_call(spec)} failed: {type(exc).__name__}: {reason}") from exc


def module_of(path: str) -> str:
    """The module part of a class path (``models.unet`` of ``models.unet.UNet``).

    Args:
        path: ``module.QualifiedName``.
    """
    return path.rpartition(".")[0]
