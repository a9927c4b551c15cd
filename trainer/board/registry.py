"""The registry of the board's servers: one small JSON file per folder served, in a private folder.

Every ``python -m trainer.board`` process records itself while it serves: one file per folder in
`registry_dir` (the user's temporary folder, ``trainer-board-servers-<uid>``), keyed by the
folder's resolved path, removed when the process ends. `trainer.board.servers` checks what an
entry says before it trusts it.

The registry is safe on a machine shared with other users. Its folder is made private (mode 0700)
and checked before each use: one that belongs to another user, that others can write in, or that is
a symbolic link is refused with a one-line `PermissionError` saying what to do. Entries are written
private (0600) and atomically; one that is not a regular file of this user, or not a JSON object,
is ignored and removed when read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from trainer.atomic import atomic_write_text

#: The largest registry entry read (an entry is about 200 bytes).
MAX_ENTRY_BYTES = 64 * 1024


def registry_dir() -> Path:
    """The folder of the registry: ``trainer-board-servers-<uid>`` in the user's temporary folder
    (not checked; `private_registry_dir` checks it)."""
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"trainer-board-servers-{user}"


def private_registry_dir() -> Path:
    """`registry_dir`, made private (mode 0700) if missing, once it is checked to be this user's own
    folder that no one else can write in.

    Raises:
        PermissionError: it belongs to another user, others can write in it, or it is a symbolic
            link or not a folder; the one-line message names it, what is wrong and what to do.
    """
    path = registry_dir()
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    if not hasattr(os, "getuid"):  # Windows: the temporary folder is the user's own
        return path
    info, uid = os.lstat(path), os.getuid()
    tmpdir = "set TMPDIR to a private folder of yours (e.g. export TMPDIR=$HOME/.cache/tmp)"
    if info.st_uid != uid:
        problem = f"belongs to uid {info.st_uid}, not to you (uid {uid}): made by another user, who may plant entries"
        fix = f"ask its owner or an administrator to remove it, or {tmpdir}"
    else:
        mode, problem = stat.S_IMODE(info.st_mode), ""
        if stat.S_ISLNK(info.st_mode):
            problem = "is a symbolic link, not a folder"
        elif not stat.S_ISDIR(info.st_mode):
            problem = "is not a folder"
        elif mode & 0o022:
            problem = f"can be written by other users (mode {mode:04o}), who may have planted entries"
        fix = f"remove it (rm -r {path}) and run again, or {tmpdir}"
    if problem:
        raise PermissionError(f"the TensorBoard server registry {path} {problem}; {fix}")
    if info.st_mode & 0o077:  # this user's own, readable by others (made by an older version): make it private
        os.chmod(path, 0o700)
    return path


def remove_if_empty() -> None:
    """Remove the registry folder when it holds nothing (after the last server stopped)."""
    with contextlib.suppress(OSError):
        os.rmdir(registry_dir())


def entry_path(folder: str | os.PathLike) -> Path:
    """The registry file of the server on `folder` (by its resolved path)."""
    key = hashlib.sha1(os.fspath(Path(folder).resolve()).encode()).hexdigest()[:16]
    return registry_dir() / f"{key}.json"


def entry_paths() -> list[Path]:
    """The registry files, in a stable order (after checking the folder, `private_registry_dir`)."""
    return sorted(private_registry_dir().glob("*.json"))


def write_entry(folder: str | os.PathLike, fields: dict[str, Any]) -> Path:
    """Record `fields` for the server on `folder`: a private (0600) file, written atomically (a
    reader never sees half a file), in the checked `private_registry_dir`."""
    private_registry_dir()
    return atomic_write_text(json.dumps(fields), entry_path(folder), mode=0o600)


def discard(path: Path) -> None:
    """Remove registry file `path` if it is this user's (another's is left: it cannot be ours)."""
    with contextlib.suppress(OSError):
        if not hasattr(os, "getuid") or os.lstat(path).st_uid == os.getuid():
            path.unlink()


def read_entry(path: Path) -> dict[str, Any] | None:
    """The JSON object in registry file `path`; None where there is none or it is not one (a
    symbolic link, another user's file, not JSON), which is then removed."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError:  # a symbolic link, or unreadable
        discard(path)
        return None
    with os.fdopen(descriptor, "rb") as file:
        info = os.fstat(file.fileno())
        ours = not hasattr(os, "getuid") or info.st_uid == os.getuid()
        data = file.read(MAX_ENTRY_BYTES + 1) if stat.S_ISREG(info.st_mode) and ours else b""
    try:
        entry = json.loads(data)
    except ValueError:
        entry = None
    if isinstance(entry, dict):
        return entry
    discard(path)
    return None
