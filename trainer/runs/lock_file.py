"""The lock file of a `trainer.runs.lock.RunLock` and its folder as the system shows them: the
holder's record, the kernel's lock table, where the folder went, and the one line refusing a
``.lock`` that is no plain file of its own. Standard library only."""

from __future__ import annotations

import fcntl
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

__all__ = ["LOCK_FILE", "describe_holder"]

#: The lock's file name inside the folder it guards.
LOCK_FILE = ".lock"

#: How the lock file is opened: never through a link, never waiting on a FIFO.
OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def describe_holder(holder: dict[str, Any] | None) -> str:
    """``pid P on HOST, started TIME`` from a lock record, with what it holds."""
    if not holder:
        return "a process that has not written its pid yet"
    where = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    return where + (f", started {holder['started']}" if "started" in holder else "")


def lock_status(dir_fd: int) -> os.stat_result | None:
    """The lock path's own status in the folder `dir_fd` (a link not followed), or None if missing."""
    try:
        return os.stat(LOCK_FILE, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def same_file(a: os.stat_result, b: os.stat_result | None) -> bool:
    """Whether `b` is the file of `a` (same device and inode)."""
    return b is not None and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def not_a_lock_file(path: Path, status: os.stat_result, target: str | None) -> str:
    """The one line refusing `path`, which is not a plain file of its own."""
    if stat.S_ISLNK(status.st_mode):
        what = f"a symbolic link (to {target})" if target is not None else "a symbolic link"
        why = "a lock is never written through a link, which could overwrite the file it points to"
    elif stat.S_ISREG(status.st_mode):
        what = f"a file with {status.st_nlink} hard links"
        why = "writing the lock there would change the same file under its other names"
    else:
        kind = "a folder" if stat.S_ISDIR(status.st_mode) else "a FIFO" if stat.S_ISFIFO(status.st_mode) else None
        what, why = kind or "a special file", "only a plain file holds a lock"
    return f"{path} is {what}, not a lock file ({why}); remove it, or use another folder"


def has_sticky_bit(dir_fd: int) -> bool:
    """Whether the folder `dir_fd` has the sticky bit (only a file's owner may remove it)."""
    return bool(os.fstat(dir_fd).st_mode & stat.S_ISVTX)


def user_name(uid: int) -> str:
    """``NAME (uid N)``, or ``uid N`` for a uid without a name."""
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def folder_path(dir_fd: int) -> tuple[Path | None, bool]:
    """Where the folder `dir_fd` is now (None when the system cannot tell), and whether it was removed."""
    if os.fstat(dir_fd).st_nlink == 0:
        return None, True
    try:
        path = os.readlink(f"/proc/self/fd/{dir_fd}")
    except OSError:
        get_path = getattr(fcntl, "F_GETPATH", None)  # macOS
        if get_path is None:
            return None, False
        try:
            path = os.fsdecode(fcntl.fcntl(dir_fd, get_path, bytes(1024)).rstrip(b"\0"))
        except OSError:
            return None, False
    if path.endswith(" (deleted)"):
        return None, True
    return Path(path), False


def flock_holder(folder: os.stat_result) -> int | None:
    """The pid that the kernel's lock table (Linux ``/proc/locks``) names as holding an exclusive
    flock on the folder `folder` on this host, or None."""
    try:
        with open("/proc/locks") as table:
            lines = table.read().splitlines()
    except OSError:
        return None
    device = f"{os.major(folder.st_dev):02x}:{os.minor(folder.st_dev):02x}:{folder.st_ino}"
    for line in lines:
        fields = line.split()  # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:1234 0 EOF" (waiters have "->" second)
        if len(fields) >= 6 and fields[1:4] == ["FLOCK", "ADVISORY", "WRITE"] and fields[5] == device:
            pid = int(fields[4])
            return pid if pid > 0 else None
    return None


def read_record(dir_fd: int) -> dict[str, Any]:
    """The record in the lock file of the folder `dir_fd`, read without following links ({} if none)."""
    try:
        fd = os.open(LOCK_FILE, os.O_RDONLY | OPEN_FLAGS, dir_fd=dir_fd)
    except OSError:
        return {}
    try:
        return read_holder(fd) if stat.S_ISREG(os.fstat(fd).st_mode) else {}
    finally:
        os.close(fd)


def read_holder(fd: int, wait: bool = False) -> dict[str, Any]:
    """The holder's record in the lock file `fd`; with `wait`, give a holder that has just taken
    the lock half a second to write it."""
    deadline = time.monotonic() + (0.5 if wait else 0.0)
    while True:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            if holder or time.monotonic() >= deadline:
                return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                return {}
        time.sleep(0.02)
