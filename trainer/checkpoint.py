"""Checkpoint files: `atomic_save` writes one, `load_checkpoint` reads one back safely (tensors and
plain values only)."""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from trainer.atomic import atomic_write


def _refuse_compressed_records(path: Path) -> None:
    """A `ValueError` for a checkpoint archive holding a compressed record: `torch.save` stores
    every record as it is, and `torch.load` would inflate a compressed one whatever its size."""
    if not zipfile.is_zipfile(path):
        return  # not an archive: torch.load says what it is
    try:
        with zipfile.ZipFile(path) as archive:
            compressed = [info.filename for info in archive.infolist() if info.compress_type != zipfile.ZIP_STORED]
    except (zipfile.BadZipFile, OSError):
        return  # damaged: torch.load says so
    if compressed:
        raise ValueError(
            f"{str(path)!r} is not a readable checkpoint (refused as unsafe: {len(compressed)} of its records are "
            f"compressed, such as {compressed[0]!r}, which torch.save never does, and would be inflated in memory "
            "whatever their size); use a file this project saved (last.pt, best.pt)"
        )


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` `obj` to `path` atomically (see `trainer.atomic`): a crash at any moment
    leaves the old file or the new one, never a broken one. A failed write (a full disk, a
    read-only folder) keeps the old `path` and raises an `OSError` naming `path`."""
    return atomic_write(path, lambda file: torch.save(obj, file))


def load_checkpoint(path: str | os.PathLike, resume: bool = False) -> dict[str, Any]:
    """Load a checkpoint written by `atomic_save`: a dict of tensors and plain values.

    Raises `FileNotFoundError` for a missing file and `ValueError` naming the file and what is
    wrong for an empty one, one that is not a checkpoint or is damaged, and one that holds
    something other than a dict (or, with `resume`, no training state). Only tensors and plain
    values are ever unpickled, and a file whose records are compressed (which `torch.save` never
    does: a small file could inflate to any size in memory) is refused before it is read.

    Args:
        path: the checkpoint file.
        resume: the file is to resume a run: refuse a weights-only one (no optimizer state).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    if path.stat().st_size == 0:
        raise ValueError(
            f"{str(path)!r} is empty (0 bytes), not a checkpoint: its write was cut short or it was "
            "truncated; use another checkpoint of the run (last.pt, best.pt)"
        )
    _refuse_compressed_records(path)
    try:
        with warnings.catch_warnings():
            # a pickle of another protocol is refused below, or read; either way the warning is noise
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise ValueError(
            f"{str(path)!r} is not a readable checkpoint ({_load_failure(exc)}); use a file this "
            "project saved (last.pt, best.pt)"
        ) from exc
    if not isinstance(state, dict):
        raise ValueError(
            f"{str(path)!r} holds a {type(state).__name__}, not a checkpoint (a dict with the model, "
            "optimizer and run state); use a file this project saved (last.pt, best.pt)"
        )
    if resume and "optimizer" not in state:
        kind = "a weights-only checkpoint (the model alone)" if "model" in state else "no training state"
        raise ValueError(
            f"{str(path)!r} holds {kind}: it rebuilds the model (trainer.load_model, predict), but cannot "
            "resume a run, which needs the optimizer and training state: resume from a last.pt that training wrote"
        )
    return state


def _load_failure(exc: Exception) -> str:
    """What `torch.load` found wrong, in a few words, never with its advice to load the file
    another way (``weights_only=False``, allowlisting globals): a file that ``weights_only``
    loading refuses is refused as unsafe."""
    text = " ".join(str(exc).split())
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        named = re.search(r"GLOBAL ([\w.]+)", text)
        operand = re.search(r"Unsupported (operand|class) \w+", text)
        if named:
            reason = f"it names {named[1]}, which loading would import or call"
        elif operand:
            reason = f"its pickle stream has an instruction tensors and plain values never need ({operand[0]})"
        else:
            reason = "its pickle stream holds something other than tensors and plain values"
        return (
            "refused as unsafe: it is damaged, or holds objects other than tensors and plain values, "
            f"and loading it could run code; {reason}"
        )
    if "zip archive" in text or "central directory" in text:
        return f"damaged or not a file written by torch.save: {text.split('. ', 1)[0]}"
    return text or type(exc).__name__
