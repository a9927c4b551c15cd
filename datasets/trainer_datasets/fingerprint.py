"""The fingerprint of a data folder: the files it holds and their sizes (and, where asked, times)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def data_files(
    root: str | os.PathLike, files: Iterable[str | os.PathLike], times: bool = False
) -> dict[str, int] | dict[str, list[int]]:
    """The fingerprint of the data a run reads: ``{path relative to root: size in bytes}``,
    sorted. (Sizes, not modification times: a folder copied to another machine keeps its sizes.)

    Args:
        root: the data folder.
        files: the files the run reads, inside `root`.
        times: give ``[size, modification time, status change time]`` (in ns) per file instead of
            the size: for caches kept on this machine, where a file rewritten with the same size
            must count as changed, even when its modification time was set back (which also sets
            the status change time, and nothing can set that back).
    """
    root = os.fspath(root)
    found: dict = {}
    # Plain strings rather than Path objects: a folder of 100,000 files costs no more memory than its names.
    for file in (os.fspath(path) for path in files):
        info = os.stat(file)
        name = Path(os.path.relpath(file, root)).as_posix() if os.sep != "/" else os.path.relpath(file, root)
        found[name] = [info.st_size, info.st_mtime_ns, info.st_ctime_ns] if times else info.st_size
    return dict(sorted(found.items()))
