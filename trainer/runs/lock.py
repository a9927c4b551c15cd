"""`RunLock`: one writer per run folder, an OS lock on the folder itself, held for the life of a run.

A training run (new or resumed) or a prediction takes the lock of the folder it writes before
it writes anything there, and holds it until it ends. The lock is ``fcntl.flock`` on a descriptor
of the folder itself (opened with ``O_DIRECTORY``), so it guards the folder, not a file name:
removing or replacing a file inside it frees nothing, and a folder created later at the same
path is another folder. The lock file ``.lock`` inside the folder holds the holder's pid, host and
start time so that a refused process can say who has the folder; it is flocked too (where a file
system keeps folder locks on one host only, e.g. NFS, the file's lock is what another host sees)
and it is opened without following links: a ``.lock`` that is a symbolic link, a hard link, a
folder or anything but a plain file is refused (`LockFileError`), never written.

The kernel drops a flock when its holder dies, even by SIGKILL, so a lock left by a killed process
is stale: the next run takes it over (also another user's stale lock file, where the folder lets
this user remove it). A holder can ask at any time whether its folder is still where it was and
its lock file still its own (`RunLock.check`); release removes the lock file only while it is this
holder's, wherever the folder went. A lock is only as good as the file system's flock: local disks
hold it; an NFS mount may not across hosts. Child processes forked while it is held (data-loader
workers) share it until they exit.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from trainer.runs.lock_file import (
    LOCK_FILE,
    OPEN_FLAGS,
    describe_holder,
    flock_holder,
    folder_path,
    has_sticky_bit,
    lock_status,
    not_a_lock_file,
    read_holder,
    read_record,
    same_file,
    user_name,
)

__all__ = ["LockFileError", "RunLock", "RunLockLostError", "RunLockedError"]


class RunLockedError(RuntimeError):
    """The folder's lock is held by another live process.

    Attributes:
        folder: the folder that is in use.
        holder: what the holder wrote in the lock file (``pid``, ``host``, ``started``), only
            ``pid`` and ``host`` when its lock file was removed (read from the kernel's lock
            table where there is one), or {} when it is not known.
    """

    def __init__(self, folder: Path, holder: dict[str, Any]) -> None:
        self.folder, self.holder = folder, holder
        super().__init__(
            f"{folder} is in use by another run ({describe_holder(holder)}); wait for it to end or use another folder"
        )


class LockFileError(RuntimeError):
    """The folder's lock file cannot be used: it is not a plain file of its own (a symbolic or
    hard link, a folder, a FIFO...), or it is another user's stale lock file that this user may not
    remove. The message is one line saying which and what to do.

    Attributes:
        path: the lock file.
    """

    def __init__(self, path: Path, message: str) -> None:
        self.path = path
        super().__init__(message)


class RunLockLostError(RuntimeError):
    """`RunLock.check`: the folder was moved or removed, or its lock file removed or replaced,
    while the lock was held.

    Attributes:
        folder: the folder as the lock was given it.
        moved_to: where the folder is now, when it was moved and the system can tell (else None).
        removed: the folder itself was removed.
        lock_file: only the lock file was removed or replaced (the folder is in place).
    """

    def __init__(self, folder: Path, message: str, moved_to: Path | None, removed: bool, lock_file: bool) -> None:
        self.folder, self.moved_to, self.removed, self.lock_file = folder, moved_to, removed, lock_file
        super().__init__(message)


class RunLock:
    """The exclusive lock of one folder, as a context manager (``with RunLock(run_dir): ...``)
    or with `acquire` and `release`.

    `acquire` never waits: another live holder raises `RunLockedError` naming it; a lock file
    that is not a plain file of its own raises `LockFileError`. An unwritable folder raises the
    `OSError` of creating the lock file. `release` removes the lock file if it is still this
    holder's, so a folder shows ``.lock`` only while a run is using it (or after a killed run,
    until the next run takes it over).

    Args:
        folder: the folder to guard (it must exist).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        #: What a killed holder had written in the lock file this process took over, else None.
        self.taken_over: dict[str, Any] | None = None
        self._fd: int | None = None  # the lock file, flocked
        self._dir_fd: int | None = None  # the folder, flocked where the file system allows
        self._where = ""  # the folder's absolute path when it was locked, which `check` looks at
        self._identity: tuple[int, int] = (0, 0)  # the folder's device and inode

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock and write this process's pid, host and start time in it; returns self."""
        if self._fd is not None:
            return self
        self._where = os.path.abspath(self.folder)
        dir_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunLockedError(self.folder, self._holder_of(dir_fd)) from None
            except OSError:
                pass  # a file system without locks on folders: the lock file's flock alone guards it
            fd, foreign = self._lock_file(dir_fd)
        except BaseException:
            os.close(dir_fd)
            raise
        self._fd, self._dir_fd = fd, dir_fd
        folder = os.fstat(dir_fd)
        self._identity = (folder.st_dev, folder.st_ino)
        try:
            self.taken_over = read_holder(fd) or foreign or None
            text = json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            )
            os.ftruncate(fd, 0)
            if os.pwrite(fd, text.encode(), 0) != len(text):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        except OSError as exc:
            self.release()
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None
        return self

    def _lock_file(self, dir_fd: int) -> tuple[int, dict[str, Any] | None]:
        """Open and flock the lock file in the folder `dir_fd` (created if missing, taken over if
        stale): its descriptor, and the record of another user's stale lock file it replaced."""
        foreign = None
        while True:
            self._refuse_unless_plain_file(dir_fd)
            try:
                fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | OPEN_FLAGS, 0o644, dir_fd=dir_fd)
            except PermissionError:
                foreign = self._remove_foreign(dir_fd)  # another user's 0644 file, or an unwritable folder
                continue
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):  # a link or folder planted just now
                    self._refuse_unless_plain_file(dir_fd)
                raise OSError(exc.errno, exc.strerror, str(self.path)) from None
            try:
                status = os.fstat(fd)
                if not stat.S_ISREG(status.st_mode) or status.st_nlink > 1:
                    raise LockFileError(self.path, not_a_lock_file(self.path, status, None))
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise RunLockedError(self.folder, read_holder(fd, wait=True)) from None
                # A holder of the file alone (another host, or a file removed as it was released):
                # a lock on a file no longer in the folder guards nothing.
                if same_file(status, lock_status(dir_fd)):
                    return fd, foreign
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def _refuse_unless_plain_file(self, dir_fd: int) -> None:
        """Raise `LockFileError` when the lock path is anything but a missing or plain file with one name."""
        status = lock_status(dir_fd)
        if status is not None and (not stat.S_ISREG(status.st_mode) or status.st_nlink > 1):
            target = None
            if stat.S_ISLNK(status.st_mode):
                with contextlib.suppress(OSError):
                    target = os.readlink(LOCK_FILE, dir_fd=dir_fd)
            raise LockFileError(self.path, not_a_lock_file(self.path, status, target))

    def _remove_foreign(self, dir_fd: int) -> dict[str, Any]:
        """The lock file could not be opened for writing: when it is another user's and no live
        process holds it, remove it (returning its record); when this user may not remove it, one
        line saying so (`LockFileError`); an unwritable folder is the `OSError` it gives."""
        status = lock_status(dir_fd)
        if status is None or status.st_uid == os.geteuid():
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(self.path))
        record: dict[str, Any] = {}
        try:
            fd = os.open(LOCK_FILE, os.O_RDONLY | OPEN_FLAGS, dir_fd=dir_fd)
        except OSError:
            fd = None  # unreadable (0600): its holder is dead, or the folder's lock would have refused us
        if fd is not None:
            try:
                record = read_holder(fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise RunLockedError(self.folder, read_holder(fd, wait=True)) from None
                except OSError:
                    pass
            finally:
                os.close(fd)
        try:
            os.unlink(LOCK_FILE, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.EPERM:  # EACCES: the folder cannot be written at all
                raise OSError(exc.errno, exc.strerror, str(self.path)) from None
            owner = user_name(status.st_uid)
            left = f"left by {describe_holder(record)}, which no longer runs" if record else "which no live run holds"
            sticky = " (the folder has the sticky bit: only the file's owner may)" if has_sticky_bit(dir_fd) else ""
            raise LockFileError(
                self.path,
                f"{self.path} is a stale lock file of another user, {owner}, {left}; this user may not remove "
                f"it{sticky}: ask {owner.split()[0]} or an administrator to remove it, or use another folder",
            ) from None
        return record

    def check(self) -> None:
        """Raise `RunLockLostError` when, since `acquire`, the folder was moved or removed (its path
        leads to another folder, or to none), or its lock file was removed or replaced. Cheap (a
        few ``stat`` calls): call it before a run writes at a checkpoint or an epoch's end. Does
        nothing when the lock is not held."""
        if self._fd is None or self._dir_fd is None:
            return
        try:
            now = os.stat(self._where)
            here = (now.st_dev, now.st_ino) == self._identity
        except OSError:
            here = False
        if not here:
            moved_to, removed = folder_path(self._dir_fd)
            if removed:
                what = f"the folder {self.folder} was removed"
            elif moved_to is not None:
                what = f"the folder {self.folder} was moved to {moved_to}"
            else:
                what = f"the folder {self.folder} was moved or removed"
            raise RunLockLostError(self.folder, what, moved_to, removed, lock_file=False)
        current = lock_status(self._dir_fd)
        if not same_file(os.fstat(self._fd), current):
            record = read_record(self._dir_fd) if current is not None else {}
            what = f"the lock file {self.path} was " + (
                "removed"
                if current is None
                else f"replaced by one of {describe_holder(record)}"
                if record
                else "replaced"
            )
            raise RunLockLostError(self.folder, what, None, removed=False, lock_file=True)

    def release(self) -> None:
        """Remove the lock file if it is still this holder's (wherever the folder went) and drop
        the lock (nothing if it is not held)."""
        if self._fd is None:
            return
        fd, dir_fd, self._fd, self._dir_fd = self._fd, self._dir_fd, None, None
        try:
            if dir_fd is not None and same_file(os.fstat(fd), lock_status(dir_fd)):
                os.unlink(LOCK_FILE, dir_fd=dir_fd)
        except OSError:
            pass  # a read-only folder keeps the file; the kernel still drops the locks below
        finally:
            os.close(fd)
            if dir_fd is not None:
                os.close(dir_fd)

    def holder(self) -> dict[str, Any]:
        """What the current holder wrote in the lock file ({} when there is none)."""
        try:
            dir_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return {}
        try:
            return read_record(dir_fd)
        finally:
            os.close(dir_fd)

    def live_holder(self) -> dict[str, Any] | None:
        """The record of the live process holding the lock ({} if it is not known), or None when
        no live process holds it. It peeks with shared locks for an instant, during which another
        process's `acquire` would be refused."""
        try:
            dir_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(dir_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return self._holder_of(dir_fd)
            except OSError:
                pass
            else:
                fcntl.flock(dir_fd, fcntl.LOCK_UN)
            try:  # a holder of the lock file alone (another host)
                fd = os.open(LOCK_FILE, os.O_RDONLY | OPEN_FLAGS, dir_fd=dir_fd)
            except OSError:
                return None
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    return None
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return None
            except BlockingIOError:
                return read_holder(fd, wait=True)
            finally:
                os.close(fd)
        finally:
            os.close(dir_fd)

    def _holder_of(self, dir_fd: int) -> dict[str, Any]:
        """Who holds the folder `dir_fd` locked: its lock file's record (given half a second to
        be written), else the pid the kernel's lock table names on this host, else {}."""
        deadline = time.monotonic() + 0.5
        while True:
            record = read_record(dir_fd)
            if record or lock_status(dir_fd) is None or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        if record:
            return record
        pid = flock_holder(os.fstat(dir_fd))
        return {"pid": pid, "host": socket.gethostname()} if pid is not None else {}

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()
