"""Atomic checkpoint files and the random-generator state they carry."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` `obj` to `path` atomically: a temporary file in the same folder, flushed
    and fsynced, then renamed over `path`. A crash at any moment leaves the old file or the new
    one, never a broken one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint written by `atomic_save`: a dict of tensors and plain values.

    Raises `FileNotFoundError` for a missing file and `ValueError` naming the file and what is
    wrong for an empty one, one that is not a checkpoint or is damaged, and one that holds
    something other than a dict. Only tensors and plain values are ever unpickled.

    Args:
        path: the checkpoint file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    if path.stat().st_size == 0:
        raise ValueError(f"{str(path)!r} is empty (0 bytes), not a checkpoint: its write was cut short or it was "
                         "truncated; use another checkpoint of the run (last.pt, best.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise ValueError(f"{str(path)!r} is not a readable checkpoint ({_load_failure(exc)}); use a file this "
                         "project saved (last.pt, best.pt)") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a checkpoint (a dict with the model, "
                         "optimizer and run state); use a file this project saved (last.pt, best.pt)")
    return state


def _load_failure(exc: Exception) -> str:
    """What `torch.load` found wrong, in a few words, without its advice to unpickle arbitrary objects."""
    text = " ".join(str(exc).split())
    if "WeightsUnpickler error:" in text:
        reason = text.split("WeightsUnpickler error:", 1)[1].split(" Check the documentation", 1)[0].strip()
        return f"it is damaged, or holds objects other than tensors and plain values: {reason}"
    if "zip archive" in text or "central directory" in text:
        return f"damaged or not a file written by torch.save: {text.split('. ', 1)[0]}"
    return text or type(exc).__name__


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's and torch's (CPU and every CUDA device's) generator states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generator states saved by `rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
