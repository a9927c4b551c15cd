"""The TensorBoard servers of `trainer.board.show`: one background process per folder, recorded in
a registry so that later calls, re-runs of a notebook cell and a restarted kernel find it again.

Every ``python -m trainer.board`` process records itself while it serves: one small JSON file per
folder in `registry_dir` (the user's temporary folder, ``trainer-board-servers-<uid>``), keyed by the
folder's resolved path, removed when the process ends (Ctrl-C, SIGTERM, SIGHUP or an error). An
entry whose process is gone, or whose port no longer serves that folder (a killed process, a reused
pid), is ignored and removed on sight.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer.checkpoint import atomic_write_text

#: How long `spawn` waits for a new server to answer; TensorBoard starts in a few seconds.
START_TIMEOUT = 120.0
_children: dict[int, subprocess.Popen] = {}  # servers this process started, reaped when stopped


def registry_dir() -> Path:
    """The folder of the registry: ``trainer-board-servers-<uid>`` in the user's temporary folder."""
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"trainer-board-servers-{user}"


def entry_path(folder: str | os.PathLike) -> Path:
    """The registry file of the server on `folder` (by its resolved path)."""
    key = hashlib.sha1(os.fspath(Path(folder).resolve()).encode()).hexdigest()[:16]
    return registry_dir() / f"{key}.json"


@dataclass(frozen=True)
class BoardServer:
    """A TensorBoard server process serving one folder.

    Attributes:
        path: the folder it serves (resolved).
        pid: its process id.
        port: the TCP port it listens on.
        host: the address it is bound to.
        url: its address on this machine, e.g. ``http://127.0.0.1:6006/``.
    """

    path: str
    pid: int
    port: int
    host: str
    url: str

    def answers(self, timeout: float = 2.0) -> bool:
        """Whether the server answers on its port and serves `path` (not another folder)."""
        try:
            with urllib.request.urlopen(f"{self.url}data/environment", timeout=timeout) as response:
                environment = json.loads(response.read().decode())
        except (OSError, ValueError):
            return False
        return environment.get("data_location") == self.path

    def stop(self, timeout: float = 10.0) -> None:
        """End the server (SIGTERM: it removes its temporary files and registry entry) and wait
        until it is gone; safe to call more than once."""
        if _alive(self.pid) and self.answers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        unregister(self.path, self.pid)


def _alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:  # our own child: poll() reaps it, so a finished one is not a zombie
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def register(server: BoardServer) -> Path:
    """Record `server` in the registry (atomically: a reader never sees half a file)."""
    return atomic_write_text(json.dumps(asdict(server)), entry_path(server.path))


def unregister(folder: str | os.PathLike, pid: int) -> None:
    """Remove the registry entry of `folder` if it is the one of process `pid`."""
    path = entry_path(folder)
    entry = _read(path)
    if entry is not None and entry.pid == pid:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _read(path: Path) -> BoardServer | None:
    try:
        return BoardServer(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def find(folder: str | os.PathLike) -> BoardServer | None:
    """The live server on `folder`, or None (a stale entry is removed)."""
    path = entry_path(folder)
    server = _read(path)
    if server is None:
        return None
    if _alive(server.pid) and server.answers():
        return server
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return None


def running() -> list[BoardServer]:
    """Every live server in the registry (stale entries are removed)."""
    found = []
    for path in sorted(registry_dir().glob("*.json")):
        server = _read(path)
        if server is not None and find(server.path) == server:
            found.append(server)
    return found


def spawn(folder: str | os.PathLike, port: int | None = None, host: str = "127.0.0.1") -> BoardServer:
    """Start ``python -m trainer.board folder`` in the background, in its own session (a kernel
    interrupt or restart does not reach it), and return it once it answers.

    Raises:
        OSError: it could not serve (its one-line error), or did not answer in `START_TIMEOUT` s.
    """
    folder = Path(folder).resolve()
    package_root = os.fspath(Path(__file__).resolve().parent.parent)  # this checkout's `trainer`
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    registry_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(mode="w+", dir=registry_dir(), prefix="log-") as log:
        command = [sys.executable, "-m", "trainer.board", os.fspath(folder), "--host", host]
        if port is not None:
            command += ["--port", str(port)]
        child = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True
        )
        _children[child.pid] = child
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            server = _read(entry_path(folder))
            if server is not None and server.pid == child.pid and server.answers():
                return server
            if child.poll() is not None:
                log.seek(0)
                lines = [line for line in log.read().splitlines() if line.strip()]
                if lines and lines[-1].startswith("error: "):  # its own one-line error names the folder
                    raise OSError(lines[-1].removeprefix("error: "))
                raise OSError(
                    f"TensorBoard could not serve {os.fspath(folder)!r}: "
                    f"{lines[-1] if lines else f'exit status {child.returncode}'}"
                )
            time.sleep(0.1)
        child.terminate()
        child.wait()
        raise OSError(f"TensorBoard did not answer within {START_TIMEOUT:.0f} s for {os.fspath(folder)!r}")
