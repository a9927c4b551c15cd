"""Atomic file writes: a temporary file beside the target, flushed and fsynced, renamed over it.

A crash at any moment leaves the old file or the new one, never a broken one; a failed write (a
full disk, a read-only folder) removes the temporary file, keeps the old file and raises an
`OSError` naming the target. The one atomic write of the project; standard library only.

- `atomic_write(path, write)`: ``write(file)`` fills a binary file object;
- `atomic_write_text(text, path)`: UTF-8 text;
- `atomic_path(path)`: for writers that take a path (an image library's ``save``): yields the
  temporary path, renamed over `path` when the block ends without an error;
- `remove_temporary_files(folder)`: the temporary files killed writers left.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TypeVar

E = TypeVar("E", bound=BaseException)


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


def _first_in_chain(exc: BaseException, kind: type[E]) -> E | None:
    """The first exception of type `kind` among `exc` and its causes (``__cause__``, else
    ``__context__``), or None."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, kind):
        cause = cause.__cause__ or cause.__context__
    return cause


def write_failure(exc: BaseException, path: str | os.PathLike) -> OSError | None:
    """`exc` as an `OSError` naming `path` (errno and reason kept), when it is a failed write:
    an `OSError`, or an error raised from one (torch.save raises a `RuntimeError` when its file's
    write fails, a full disk: ``[enforce fail at inline_container.cc...]``, with the `OSError` as
    its context). None for any other error."""
    cause = _first_in_chain(exc, OSError)
    if cause is None:
        return None
    return OSError(cause.errno, cause.strerror or str(cause), os.fspath(path))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield the temporary path of an atomic write of `path`; when the block ends without an
    error, fsync that file, rename it over `path` and fsync the folder. Any failure removes the
    temporary file, leaves `path` as it was and raises an `OSError` naming `path` (see
    `write_failure`), or `KeyboardInterrupt` when a Ctrl-C cut a write off (a writer that catches
    it raises a `RuntimeError` from it, as torch.save's does).

    Args:
        path: the file to write.
        mode: the permissions of a new file (e.g. ``0o600`` for a private one); default: the umask's.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if mode is not None:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), mode))
        yield tmp
        descriptor = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)
    except (OSError, RuntimeError) as exc:
        if _first_in_chain(exc, KeyboardInterrupt) is not None:
            raise KeyboardInterrupt from exc
        failure = write_failure(exc, path)
        if failure is None:
            raise
        raise failure from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object], mode: int | None = None) -> Path:
    """Call ``write(file)`` on a binary file that becomes `path` atomically (see `atomic_path`).

    Args:
        path: the file to write.
        write: fills the file object it is given.
        mode: the permissions of a new file (default: the umask's).
    """
    with atomic_path(path, mode) as tmp, open(tmp, "r+b" if mode is not None else "wb") as file:
        write(file)
        file.flush()
    return Path(path)


def atomic_write_text(text: str, path: str | os.PathLike, mode: int | None = None) -> Path:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_path`)."""
    return atomic_write(path, lambda file: file.write(text.encode()), mode)
