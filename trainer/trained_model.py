"""Trained models from checkpoints: what a checkpoint says about itself, and `load_model`.

A checkpoint `ModelCheckpoint` writes is a dict (read with `trainer.checkpoint.load_checkpoint`):

==================  =====================================================================
key                 what it holds
==================  =====================================================================
``format_version``  `FORMAT_VERSION` (files without it predate self-describing checkpoints)
``model_spec``      how to rebuild the model: ``{"class": "models.unet.UNet", "args": [...],
                    "kwargs": {"num_classes": 1, "input_channels": 3}}`` (`trainer.model_spec`)
``model``           the model's weights (its ``state_dict()``)
``data``            the data's sizing and class names as the run gave them (e.g. ``classes``,
                    ``image_size``, ``input_channels``, ``mask_type``); ``{}`` when it gave none
``config``          the run's configuration (e.g. a recipe's options); ``{}`` when none
``optimizer``,      the rest of `Trainer.state_dict()`, which `fit(resume_from=...)` needs:
``scheduler``, ...  scheduler, grad scaler, epochs done, global step, history, random
                    generators, callback states, the position inside an epoch
==================  =====================================================================

A weights-only checkpoint (`ModelCheckpoint(best_weights_only=True)`'s ``best.pt``, or
`export_model`'s file) holds the first five keys alone: it rebuilds the model, it cannot resume.

`load_model` treats every file as possibly hostile: it reads tensors and plain values only,
bounds what the file names (`trainer.model_spec.check_spec`, `check_data`), builds the model on
the ``meta`` device and compares it with the file's weights before it allocates anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from trainer.checkpoint import atomic_save, load_checkpoint
from trainer.model_spec import ModelSpecError, rebuild_model, registration_limit, short_repr

#: The layout of the checkpoints this version writes (the keys in this module's docstring).
FORMAT_VERSION = 2
#: The keys that describe a trained model; a weights-only checkpoint holds these alone.
MODEL_KEYS = ("format_version", "model_spec", "model", "data", "config")
#: The largest ``data["image_size"]`` (the side of the square images are resized to) a checkpoint may give.
MAX_IMAGE_SIZE = 8192
#: The most class names ``data["classes"]`` may hold (label maps are 16-bit: 65536 values).
MAX_CLASSES = 65536
#: The largest ``data["input_channels"]`` a checkpoint may give.
MAX_INPUT_CHANNELS = 1024
#: How many times the bytes of the file's weights the rebuilt model may take (a float32 model of
#: float16 weights takes twice, of 8-bit ones four times), plus `_SLACK` bytes.
MAX_WIDENING = 4
_SLACK = 1 << 20
_SHORT = short_repr(level=2, items=4, text=40)


def describe(
    model_spec: dict[str, Any] | None, data: Mapping[str, Any] | None, config: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The keys that make a checkpoint self-describing (all of `MODEL_KEYS` but ``model``).

    Args:
        model_spec: `trainer.model_spec.record_model` of the model (None: not recorded, the
            key is left out).
        data: the data's sizing and class names (None: none given).
        config: the run's configuration (None: none given).
    """
    described = {
        "format_version": FORMAT_VERSION,
        "model_spec": model_spec,
        "data": dict(data or {}),
        "config": dict(config or {}),
    }
    if model_spec is None:
        del described["model_spec"]
    return described


def weights_only(state: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a checkpoint that rebuilds its model (`MODEL_KEYS`), without the training state.

    Args:
        state: a full checkpoint.
    """
    return {key: state[key] for key in MODEL_KEYS if key in state}


def _what(source: str, state: Mapping[str, Any]) -> str:
    """What a checkpoint is, for messages: its path and format version."""
    version = state.get("format_version")
    if version is None:
        return source
    return f"{source} (checkpoint format {_SHORT.repr(version)})"


def _listing(keys: Iterable[Any], limit: int = 3) -> str:
    """A few of `keys` for messages, shortened, and how many more there are."""
    keys = list(keys)
    shown = ", ".join(key if isinstance(key, str) and len(key) <= 80 else _SHORT.repr(key) for key in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_data(data: Any, source: str | os.PathLike) -> None:
    """Refuse a checkpoint's ``data`` whose sizes no run has: a `ValueError` of one line naming
    the file, the value and the bound.

    Checked where present: ``image_size`` (None or a whole number from 1 to `MAX_IMAGE_SIZE`),
    ``input_channels`` (1 to `MAX_INPUT_CHANNELS`) and ``classes`` (a list of at most
    `MAX_CLASSES` names, each a string of at most 200 characters).

    Args:
        data: the checkpoint's ``data`` (None: not recorded).
        source: the file, for messages.
    """
    if data is None:
        return
    if not isinstance(data, Mapping):
        raise ValueError(f"{source} holds a damaged data record: a {type(data).__name__}, not a dict")
    for key, largest, what in (
        ("image_size", MAX_IMAGE_SIZE, "an image size is None or a whole number"),
        ("input_channels", MAX_INPUT_CHANNELS, "a number of input channels is a whole number"),
    ):
        value = data.get(key)
        if value is None and key == "image_size":
            continue
        if key in data and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= largest):
            raise ValueError(f"{source} gives {key} {_SHORT.repr(value)} in its data; {what} from 1 to {largest}")
    classes = data.get("classes")
    if classes is None:
        return
    if not isinstance(classes, (list, tuple)) or len(classes) > MAX_CLASSES:
        size = f"{len(classes)} class names" if isinstance(classes, (list, tuple)) else f"a {type(classes).__name__}"
        raise ValueError(
            f"{source} gives {size} as the classes in its data; classes are a list of at most {MAX_CLASSES} names"
        )
    bad = [name for name in classes if not isinstance(name, str) or len(name) > 200]
    if bad:
        raise ValueError(
            f"{source} gives the class name {_SHORT.repr(bad[0])} in its data; a class name is a string "
            "of at most 200 characters"
        )


def check_model_state(state: Mapping[str, Any], source: str | os.PathLike) -> None:
    """Refuse a checkpoint that cannot rebuild its model: a `ValueError` saying what the file
    is and what it lacks, or what in its ``data`` is out of bounds (`check_data`).

    Args:
        state: the loaded checkpoint.
        source: the file, for messages.
    """
    source = str(source)
    if not isinstance(state.get("model"), Mapping):
        keys = _listing(sorted(key for key in state if isinstance(key, str)), 8) or "nothing"
        raise ValueError(
            f"{_what(source, state)} holds no model weights (no 'model' state dict; it holds "
            f"{keys}); use a checkpoint ModelCheckpoint wrote (last.pt, best.pt)"
        )
    if "model_spec" not in state:
        age = (
            "it has no format_version: written before checkpoints recorded their model"
            if "format_version" not in state
            else "the run did not record it"
        )
        raise ValueError(
            f"{_what(source, state)} holds weights but no model_spec (the model's class and "
            f"constructor arguments; {age}); build the model yourself and load its weights with "
            "model.load_state_dict(load_checkpoint(path)['model'])"
        )
    check_data(state.get("data"), _what(source, state))


def load_model(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    allowed: Iterable[type] = (),
    trusted: bool = False,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The trained model of a checkpoint: rebuilt from its ``model_spec``, with its weights, on
    `device`, in eval mode.

    Safe for files from elsewhere: the file is read with ``weights_only`` loading (tensors and
    plain values only; anything else is refused as unsafe), and only allowed classes are built:
    PyTorch's layers, the project's models (`models.UNet`, `models.NestedUNet`,
    `models.FashionCNN`) and those in `allowed`; the module a file names is never imported unless
    `trusted`. Nothing is allocated before the file is checked: the spec's nesting and sizes are
    bounded (`trainer.model_spec.check_spec`), as are the sizes its ``data`` gives (`check_data`);
    the model is built on the ``meta`` device (no memory, no random draws) and its parameter and
    buffer names and shapes are compared with the file's weights, which must also hold the bytes
    the model will take. Only then are its tensors allocated on `device` and filled with the
    file's values, exactly.

    Raises `FileNotFoundError` or `ValueError` naming the file and what it lacks (no weights, no
    model_spec) or what is out of bounds, and `trainer.model_spec.ModelSpecError` (a
    `ValueError`) for a class that is not allowed or weights that do not fit the rebuilt model.

    Args:
        checkpoint: a checkpoint file (``RUN/best.pt``), or a checkpoint already loaded with
            `trainer.checkpoint.load_checkpoint`.
        allowed: further model classes to rebuild, e.g. ``[MyNet]``.
        trusted: rebuild any class the file names, importing its module (runs that module's
            code: only for files you wrote).
        device: where the model goes (``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a `torch.device`).
    """
    if isinstance(checkpoint, Mapping):
        return model_from_state(checkpoint, "the checkpoint", allowed, trusted, device)
    return model_from_state(load_checkpoint(checkpoint), checkpoint, allowed, trusted, device)


def model_from_state(
    state: Mapping[str, Any],
    source: str | os.PathLike,
    allowed: Iterable[type] = (),
    trusted: bool = False,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """`load_model` of a checkpoint loaded already, with `source` naming it in messages.

    Args:
        state: the loaded checkpoint.
        source: the file it was loaded from.
        allowed: further model classes to rebuild.
        trusted: rebuild any class the file names, importing its module.
        device: where the model goes.
    """
    source = str(source)
    check_model_state(state, source)
    what, weights = _what(source, state), state["model"]
    with registration_limit(4 * len(weights) + 1000, what):
        model = rebuild_model(state["model_spec"], allowed=allowed, trusted=trusted, source=what, device="meta")
    check_weights(model, weights, what)
    if _kept_outside_state(model):  # values the weights do not hold: built for real, now that its size is known
        with torch.random.fork_rng(devices=[]):
            model = rebuild_model(state["model_spec"], allowed=allowed, trusted=trusted, source=what)
    else:
        materialize(model, device)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise ModelSpecError(
            f"the weights of {what} do not fit {type(model).__name__} built from "
            f"its model_spec: {' '.join(str(exc).split())[:400]}"
        ) from exc
    return model.to(device).eval()


def check_weights(model: nn.Module, weights: Mapping[Any, Any], source: str) -> None:
    """Refuse `weights` that do not fit `model` (built on the ``meta`` device): a
    `ModelSpecError` of one line naming `source` and the first names that differ.

    The names of the model's parameters and buffers (its ``state_dict``) must be the keys of
    `weights`, each a tensor of the same shape; and the model must not take more than
    `MAX_WIDENING` times the bytes the weights hold (tensors repeated under many names, or
    expanded from a few values, would make a small file allocate a large model).

    Args:
        model: the model the file's spec builds, on the ``meta`` device.
        weights: the file's ``model`` state dict.
        source: the file, for messages.
    """
    expected = model.state_dict(keep_vars=True)
    problems = []
    if not weights:
        problems.append(f"the file holds no weights (an empty state dict); the model has {len(expected)}")
    else:
        missing = [key for key in expected if key not in weights]
        unexpected = [key for key in weights if key not in expected]
        if missing:
            problems.append(f"{len(missing)} of its {len(expected)} weights are missing ({_listing(missing)})")
        if unexpected:
            problems.append(f"the file has {len(unexpected)} weights it does not ({_listing(unexpected)})")
        for key, tensor in expected.items():
            value = weights.get(key)
            if value is not None and not isinstance(value, torch.Tensor):
                problems.append(f"{key} is a {type(value).__name__}, not a tensor")
            elif value is not None and value.shape != tensor.shape:
                problems.append(f"{key} is {tuple(value.shape)} in the file but {tuple(tensor.shape)} in the model")
            if len(problems) >= 3:
                break
    if not problems:
        unique = {id(tensor): tensor for tensor in expected.values()}.values()
        needed = sum(tensor.numel() * tensor.element_size() for tensor in unique)
        storages = {
            (value.untyped_storage().data_ptr(), value.device): value.untyped_storage().nbytes()
            for value in weights.values()
        }
        held = sum(storages.values())
        if needed > MAX_WIDENING * held + _SLACK:
            problems.append(
                f"the model takes {needed / 1e6:.1f} MB, but the file holds {held / 1e6:.1f} MB of weights "
                "(tensors repeated under many names or expanded from fewer values)"
            )
    if problems:
        raise ModelSpecError(
            f"the weights of {source} do not fit {type(model).__name__} built from its model_spec: "
            + "; ".join(problems)
        )


def _kept_outside_state(model: nn.Module) -> bool:
    """Whether `model` (on the ``meta`` device) holds tensors its state dict does not: buffers
    that are not saved, lazy parameters, tensors kept as plain attributes, parameter subclasses.
    Their values come from the constructor, so such a model is built for real."""
    saved = set(model.state_dict(keep_vars=True))
    if any(name not in saved for name, _ in model.named_buffers(remove_duplicate=False)):
        return True
    if any(is_lazy(p) or type(p) is not nn.Parameter for p in model.parameters()):
        return True
    return any(isinstance(value, torch.Tensor) for module in model.modules() for value in vars(module).values())


def materialize(model: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """Give a model built on the ``meta`` device real, uninitialised tensors on `device`, in
    place (each shared parameter or buffer stays shared), for ``load_state_dict`` to fill.

    Unlike ``Module.to_empty``, a tensor that several modules share becomes one tensor.

    Args:
        model: the model, on the ``meta`` device.
        device: where its tensors go.
    """
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False, remove_duplicate=False)):
            if id(param) not in made:
                made[id(param)] = nn.Parameter(
                    torch.empty_like(param, device=device), requires_grad=param.requires_grad
                )
            setattr(module, name, made[id(param)])
        for name, buffer in list(module.named_buffers(recurse=False, remove_duplicate=False)):
            if id(buffer) not in made:
                made[id(buffer)] = torch.empty_like(buffer, device=device)
            setattr(module, name, made[id(buffer)])
    return model


def export_model(checkpoint: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write the weights-only part of `checkpoint` (`weights_only`) to `path`, atomically: a
    self-describing file that `load_model` reads, without the optimizer state (for NestedUNet
    with Adam, a third of the size).

    Raises what `load_model` raises for a checkpoint that cannot rebuild its model.

    Args:
        checkpoint: a checkpoint file (``RUN/best.pt``).
        path: the file to write.
    """
    state = load_checkpoint(checkpoint)
    check_model_state(state, checkpoint)
    return atomic_save(weights_only(state), path)
