"""`cache_folder`: where the project keeps what it measured or checked once per machine (standard library only)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_folder() -> Path:
    """The project's cache folder: ``$TRAINER_CACHE_DIR``, else ``$XDG_CACHE_HOME/trainer``, else
    ``~/.cache/trainer``. It holds the precision measurements (`trainer.probe_cache.cache_path`) and
    the index files of streamed segmentation folders; nothing in it is needed to resume a run."""
    root = os.environ.get("TRAINER_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "trainer")
