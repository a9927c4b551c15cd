"""Batches (nested tuples, lists and dicts of tensors): helpers, what a step makes of one
(`StepOutput`), and `loaded`, which draws them from a loader and names the batch it failed on."""

from __future__ import annotations

import types
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any, NamedTuple

import torch

from trainer.pinning import every_cpu

#: ``metric(predictions, targets) -> 0-dim tensor``: the batch mean of a validation metric.
Metric = Callable[[Any, Any], torch.Tensor]


class StepOutput(NamedTuple):
    """What a train or eval step returns: the batch `loss`, the model's `predictions` and the
    `targets` that metrics compare them with (None when there are none)."""

    loss: torch.Tensor
    predictions: Any
    targets: Any = None


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Apply `fn` to every tensor in a nested batch: tuples, lists (namedtuples too) and dicts are
    rebuilt with the results; other values pass through unchanged."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {key: map_tensors(item, fn) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        mapped = [map_tensors(item, fn) for item in value]
        if hasattr(value, "_fields"):  # namedtuple
            return type(value)(*mapped)
        return type(value)(mapped)
    return value


def move_to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Return `batch` with every tensor moved to `device`: asynchronously to a GPU
    (``non_blocking=True``), and to the CPU only once the data are there, ready to read.

    Tuples, lists and dicts are walked recursively; other values pass through.

    Args:
        batch: a tensor, or tuples, lists and dicts holding tensors (and other values).
        device: where the tensors go.
        channels_last: 4-D tensors also take the channels-last memory format.
    """
    return mover(device, channels_last)(batch)


def mover(device: torch.device, channels_last: bool = False) -> Callable[[Any], Any]:
    """A function that does `move_to_device` to `device` (the trainer builds it once per fit).

    Args:
        device: where tensors go.
        channels_last: whether 4-D tensors also take the channels-last memory format.
    """

    # A copy to a GPU is ordered on its stream before every kernel that reads it, so it may run
    # asynchronously; a copy from a GPU to the host returns before its data arrive, and the host
    # reading it at once (a callback's fixed batch of images) would read memory still being filled.
    non_blocking = device.type != "cpu"

    def move(tensor: torch.Tensor) -> torch.Tensor:
        if channels_last and tensor.dim() == 4:
            return tensor.to(device, non_blocking=non_blocking, memory_format=torch.channels_last)
        return tensor.to(device, non_blocking=non_blocking)

    def move_batch(batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            return move(batch)
        if type(batch) in (list, tuple) and all(isinstance(item, torch.Tensor) for item in batch):
            return type(batch)([move(item) for item in batch])  # most batches: (inputs, targets)
        return map_tensors(batch, move)

    return move_batch


def tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in a nested value (tuples, lists, dicts), depth first."""
    found: list[torch.Tensor] = []

    def collect(tensor: torch.Tensor) -> torch.Tensor:
        found.append(tensor)
        return tensor

    map_tensors(value, collect)
    return found


def detach(value: Any) -> Any:
    """Return `value` with every tensor detached from the autograd graph."""
    return map_tensors(value, torch.Tensor.detach)


def describe_tensors(value: Any) -> str:
    """The dtypes and shapes of the tensors in a nested value, e.g. ``float32 (4, 10)`` or
    ``[float32 (4, 1, 8, 8), float32 (4, 1, 8, 8)]``, for error messages."""
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {tuple(value.shape)}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key!r}: {describe_tensors(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(describe_tensors(item) for item in value) + "]"
    return type(value).__name__


def head(batch: Any, num: int) -> Any:
    """The first `num` samples of every tensor in a nested batch (0-dim tensors kept whole)."""
    return map_tensors(batch, lambda t: t[:num] if t.dim() > 0 else t)


def started(loader: Iterable) -> Iterator:
    """``iter(loader)``, made with every CPU the process may use (`trainer.pinning.every_cpu`): a
    DataLoader's worker processes start there."""
    with every_cpu():
        return iter(loader)


def peek_batch(loader: Any) -> Any:
    """The first batch of `loader`, drawn without disturbing torch's random generator, so a
    seeded run trains the same whether or not something looked at its data first."""
    state = torch.random.get_rng_state()
    try:
        return next(started(loader))
    except StopIteration:
        raise ValueError(f"the loader ({type(loader).__name__}) yielded no batches") from None
    finally:
        torch.random.set_rng_state(state)


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor found in a nested batch (depth first), or None."""
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


def batch_size(inputs: Any) -> int:
    """Number of samples in `inputs`: the first dimension of its first tensor."""
    tensor = first_tensor(inputs)
    if tensor is None or tensor.dim() == 0:
        raise TypeError(f"cannot tell the batch size: no tensor with a batch dimension in {type(inputs).__name__}")
    return tensor.shape[0]


def split_batch(batch: Any) -> tuple[Any, Any]:
    """Split a default batch into ``(inputs, targets)``.

    Accepted: a 2-tuple/list ``(inputs, targets)`` or a dict with ``"inputs"`` and
    ``"targets"`` keys. For anything else, override `Trainer.train_step`/`eval_step`.
    """
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and "inputs" in batch and "targets" in batch:
        return batch["inputs"], batch["targets"]
    shape = (
        f"a {type(batch).__name__} of length {len(batch)}"
        if isinstance(batch, (tuple, list))
        else (f"a dict with keys {sorted(batch)}" if isinstance(batch, dict) else f"a {type(batch).__name__}")
    )
    raise TypeError(
        f"the default train/eval step expects (inputs, targets) or a dict with 'inputs' and "
        f"'targets' keys, but the loader yielded {shape}; override Trainer.train_step and "
        f"Trainer.eval_step for other batch layouts"
    )


def last_output(predictions: Any) -> Any:
    """The final prediction of a model: the last element when it returns a list (deep supervision)."""
    if isinstance(predictions, (list, tuple)) and predictions:
        return predictions[-1]
    return predictions


def loaded(batches: Iterable, describe: Callable[[int], str], first: int = 0) -> Generator[Any]:
    """`batches`, with an error of the loader raised as `trainer.errors.BatchLoadError` naming the batch
    (``describe(index)``, counted from `first`).

    Nothing else holds the loader's iterator: closing this generator (as the loop does on every
    path) or an error of the loader ends it, and with it a DataLoader's worker processes. Left to
    a traceback, they would outlive the error, and at the exit of the process Python would wait
    forever for workers that ignore its SIGTERM (`trainer.ignore_stop_signals`).
    """
    iterator = started(batches)
    del batches
    index = first
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as exc:
            from trainer.errors import BatchLoadError

            del iterator
            _release_loader_frames(exc.__traceback__)
            raise BatchLoadError(describe(index), exc) from exc
        yield batch
        index += 1


def _release_loader_frames(traceback: types.TracebackType | None) -> None:
    """Clear the local variables of `torch.utils.data`'s finished frames in `traceback`: they hold
    the DataLoader's iterator. The frames of the user's own code keep theirs."""
    while traceback is not None:
        frame = traceback.tb_frame
        if str(frame.f_globals.get("__name__", "")).startswith("torch.utils.data"):
            frame.clear()
        traceback = traceback.tb_next
