"""`RunLock`: one writer per run folder, an OS file lock held for the life of a run.

A training run (new or resumed) or a prediction takes the lock of the folder it writes before
it writes anything there, and holds it until it ends. The lock is ``fcntl.flock`` on the file
``.lock`` inside the folder, which holds the holder's pid, host and start time so that a
refused process can say who has the folder. The kernel drops a flock when its holder dies, even
by SIGKILL, so a lock left by a killed process is stale: the next run takes it over. A lock is
only as good as the file system's flock: local disks hold it; an NFS mount may not across hosts.
Child processes forked while it is held (data-loader workers) share it until they exit.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

#: The lock's file name inside the folder it guards.
LOCK_FILE = ".lock"


class RunLockedError(RuntimeError):
    """The folder's lock is held by another live process.

    Attributes:
        folder: the folder that is in use.
        holder: what the holder wrote in the lock file (``pid``, ``host``, ``started``), or {}
            when it had not written it yet.
    """

    def __init__(self, folder: Path, holder: dict[str, Any]) -> None:
        self.folder, self.holder = folder, holder
        who = (
            f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
            if holder
            else "a process that has not written its pid yet"
        )
        super().__init__(f"{folder} is in use by another run ({who}); wait for it to end or use another folder")


class RunLock:
    """The exclusive lock of one folder, as a context manager (``with RunLock(run_dir): ...``)
    or with `acquire` and `release`.

    `acquire` never waits: another live holder raises `RunLockedError` naming it. An unwritable
    folder raises the `OSError` of creating the lock file. `release` removes the lock file, so a
    folder shows ``.lock`` only while a run is using it (or after a killed run, until the next
    run takes it over).

    Args:
        folder: the folder to guard (it must exist).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        #: What a killed holder had written in the lock file this process took over, else None.
        self.taken_over: dict[str, Any] | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock and write this process's pid, host and start time in it; returns self."""
        if self._fd is not None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd, wait=True)
                os.close(fd)
                raise RunLockedError(self.folder, holder) from None
            except BaseException:
                os.close(fd)
                raise
            # The previous holder removes the file as it releases: a lock on a removed file guards nothing.
            try:
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            self.taken_over = _read_holder(fd) or None
            text = json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            )
            os.ftruncate(fd, 0)
            if os.pwrite(fd, text.encode(), 0) != len(text):
                raise OSError(28, os.strerror(28), str(self.path))
        except OSError as exc:
            self._fd = fd
            self.release()
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (nothing if it is not held)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only folder keeps the file; the kernel still drops the lock below
        os.close(fd)

    def holder(self) -> dict[str, Any]:
        """What the current holder wrote in the lock file ({} when there is none)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return {}
        try:
            return _read_holder(fd)
        finally:
            os.close(fd)

    def live_holder(self) -> dict[str, Any] | None:
        """The record of the live process holding the lock ({} if it has not written it yet), or
        None when no live process holds it. It peeks with a shared lock for an instant, during
        which another process's `acquire` would be refused."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _read_holder(fd, wait=True)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()


def _read_holder(fd: int, wait: bool = False) -> dict[str, Any]:
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
