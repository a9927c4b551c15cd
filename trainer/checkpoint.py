"""Atomic checkpoint files, and the random generators: their state, which checkpoints carry, and seeding."""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch

from trainer.distributed import get_rank


def temporary_path(path: str | os.PathLike) -> Path:
    """The hidden temporary file an atomic write of `path` goes through: ``.NAME.PID.tmp``
    beside it (`remove_temporary_files` finds those a killed writer left)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_temporary_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (``.NAME[.PID].tmp``) that killed atomic writes left directly
    in `folder`, and return them. Call it only while no other process writes there (see
    `trainer.runs.lock.RunLock`)."""
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


E = TypeVar("E", bound=BaseException)


def _first_in_chain(exc: BaseException, kind: type[E]) -> E | None:
    """The first exception of type `kind` among `exc` and its causes (``__cause__``, else
    ``__context__``), or None."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, kind):
        cause = cause.__cause__ or cause.__context__
    return cause


def write_failure(exc: BaseException, path: str | os.PathLike) -> OSError | None:
    """`exc` as an `OSError` naming `path` (errno and reason kept), when it is a failed write:
    an `OSError`, or the `RuntimeError` torch.save raises when its file's write fails (a full
    disk: ``[enforce fail at inline_container.cc...]``, with the `OSError` as its context).
    None for any other error."""
    cause = _first_in_chain(exc, OSError)
    if cause is None:
        return None
    return OSError(cause.errno, cause.strerror or str(cause), os.fspath(path))


def _interrupted(exc: BaseException) -> bool:
    """Whether `exc` came from a Ctrl-C: torch.save's zip writer, cut off by the KeyboardInterrupt,
    raises a `RuntimeError` (``[enforce fail at inline_container.cc...]``) with it as its context."""
    return _first_in_chain(exc, KeyboardInterrupt) is not None


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside `path`, flush and fsync it, rename it over
    `path` and fsync the folder. Any failure removes the temporary file, leaves `path` as it was
    and raises an `OSError` naming `path` (see `write_failure`), or `KeyboardInterrupt` when a
    Ctrl-C cut the write off."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)
    except (OSError, RuntimeError) as exc:
        if _interrupted(exc):
            raise KeyboardInterrupt from exc
        failure = write_failure(exc, path)
        if failure is None:
            raise
        raise failure from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


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
    """`torch.save` `obj` to `path` atomically: a temporary file in the same folder, flushed
    and fsynced, then renamed over `path`. A crash at any moment leaves the old file or the new
    one, never a broken one. A failed write (a full disk, a read-only folder) removes the
    temporary file, keeps the old `path` and raises an `OSError` naming `path`."""
    return _atomic_write(path, lambda file: torch.save(obj, file))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write `text` (UTF-8) to `path` atomically, like `atomic_save`."""
    return _atomic_write(path, lambda file: file.write(text.encode()))


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


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) random generators.

    Args:
        seed: the seed of every generator.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Python's, NumPy's and torch's generator states: the CPU's and, once CUDA is in use, that of
    this process's GPU (`device` where it is a CUDA device with an index, else the current one)
    as ``"cuda"``, a list of one state. Under torchrun `Trainer.gather_position` puts every rank's
    there, in rank order, for the checkpoint rank 0 writes."""
    # The global generator is an MT19937: its legacy state is always the tuple.
    legacy = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    kind, keys, pos, has_gauss, gauss = legacy
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [torch.cuda.get_rng_state(_cuda_index(device))]
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore generator states saved by `rng_state`: this rank's CUDA state (the rank-th of
    ``"cuda"``) to this process's GPU (`device`, else the current one), where CUDA is here.

    A checkpoint written before ``"cuda"`` held one state per rank holds one per GPU the saving
    process saw; where each process has one GPU, index and rank are the same. A rank with no state
    saved for it (a run resumed with more processes, a checkpoint saved by one rank alone at an
    interruption) keeps its CUDA generator as it is; none is ever set on a GPU that is not here."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.random.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    rank = get_rank()
    if rank < len(cuda) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda[rank], _cuda_index(device))


def _cuda_index(device: torch.device | None) -> int:
    """The index of `device` where it is a CUDA device with one, else of the current CUDA device."""
    if device is not None and device.type == "cuda" and device.index is not None:
        return device.index
    return torch.cuda.current_device()
