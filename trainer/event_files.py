"""TensorBoard event files: the names the writers give them, and finding them.

The TensorBoard callbacks (`trainer.callbacks.tensorboard`) write them; the board
(`trainer.board`) reads them. This module imports nothing but the standard library, so that
``python -m trainer.board`` finds runs without loading torch.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The names of TensorBoard's event files (a glob pattern):
#: ``events.out.tfevents.<second>.<host>.<pid>.<counter>``.
EVENT_FILE_PATTERN = "events.out.tfevents.*"


def find_event_files(path: str | os.PathLike) -> list[Path]:
    """Every TensorBoard event file (``events.out.tfevents.*``) in or below `path`, sorted."""
    root = Path(path)
    if root.is_file():
        return [root] if root.match(EVENT_FILE_PATTERN) else []
    return sorted(p for p in root.rglob(EVENT_FILE_PATTERN) if p.is_file())


def holds_events(path: Path) -> bool:
    """Whether `path` itself (not a folder below it) holds event files: it is a run."""
    return any(p.is_file() for p in path.glob(EVENT_FILE_PATTERN))
