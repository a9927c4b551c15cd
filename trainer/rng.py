"""The random generators: `seed_everything` seeds them; `rng_state` and `set_rng_state` take and
restore their state, which a checkpoint holds so that a resumed run draws what an uninterrupted
one would."""

from __future__ import annotations

import random
from typing import Any, cast

import numpy as np
import torch


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
    as ``"cuda"``, a list of one state. Under torchrun `CheckpointState.gather_position` puts every
    rank's there, in rank order, for the checkpoint rank 0 writes."""
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
    from trainer.distributed import get_rank

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
