"""The TensorBoard servers of `trainer.board.show`: one background process per folder, recorded in
the registry (`trainer.board.registry`) so that later calls, re-runs of a notebook cell and a
restarted kernel find it again.

An entry is checked when read: its fields must have the types and values this module writes (a
pid > 0, a port from 1 to 65535, a URL of that host and port, an existing folder this user can
read, filed under its own key), else it is ignored and removed. An entry whose process is gone, or
whose port no longer serves that folder (a killed process, a reused pid), is ignored and removed on
sight.

A process is stopped only once it is proven to be the server of its entry: this user's process,
running ``python -m trainer.board`` on that folder (its command line), whose port answers as the
server of that folder; never a bare pid from a file. On Linux the signal goes through a pidfd
opened before the check, so a pid reused in between is never signalled. Stopping waits for what
the server does last, whoever started it: its registry entry removed (after its port is closed and
its folder of links removed), or its process gone; a process that has ended but that its parent (a
live kernel) has not reaped yet is gone too. A server this process started is reaped at once.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from trainer.board import processes, registry

#: How long `spawn` waits for a new server to answer; TensorBoard starts in a few seconds.
START_TIMEOUT = 120.0
#: How long `stop` waits for a server to end after the signal.
STOP_TIMEOUT = 10.0
_FIELDS = {"path": str, "pid": int, "port": int, "host": str, "url": str}


def server_url(host: str, port: int) -> str:
    """The address TensorBoard gives a server bound to `host`:`port` (an IPv6 host in brackets)."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{int(port)}/"


@dataclass(frozen=True)
class BoardServer:
    """A TensorBoard server process serving one folder.

    Evaluated as the last line of a notebook cell, it shows nothing: the cell of
    `trainer.board.show` already shows the board, and a printed record would go stale.

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
                environment = json.loads(response.read(registry.MAX_ENTRY_BYTES).decode())
        except (OSError, ValueError):
            return False
        return isinstance(environment, dict) and environment.get("data_location") == self.path

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """End the server (SIGTERM: it removes its temporary files and registry entry) and wait
        until it has; safe to call more than once. Only a process proven to be this server is
        signalled (see the module's notes); any other is left alone."""
        stop_servers([self], timeout)

    def _ipython_display_(self) -> None:
        """Nothing under a notebook cell whose last line returns a server (see the class notes)."""


def _port_open(server: BoardServer) -> bool:
    host = server.host if server.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    try:
        with socket.create_connection((host.strip("[]"), server.port), timeout=0.2):
            return True
    except OSError:
        return False


#: How long a server that has closed its port and removed its entry may take to exit.
EXIT_GRACE = 1.0


def _left(server: BoardServer) -> bool:
    """Whether `server` has done what it does last: its entry removed, its port closed."""
    entry = registry.read_entry(registry.entry_path(server.path))
    return (entry is None or entry.get("pid") != server.pid) and not _port_open(server)


def stop_servers(servers: list[BoardServer], timeout: float = STOP_TIMEOUT) -> None:
    """Signal every one of `servers` proven to be what it says, then wait (up to `timeout` seconds
    for all) until each has ended: its process gone (or a zombie), or, `EXIT_GRACE` seconds after it
    closed its port and removed its entry, still exiting. Their entries are removed."""
    waiting: dict[BoardServer, float] = {}
    with contextlib.ExitStack() as handles:
        for server in servers:  # a handle held from the check to the signal: the pid cannot be reused
            handle = handles.enter_context(processes.process_handle(server.pid))
            if not processes.gone(server.pid) and is_board_server(server) and processes.send_stop(server.pid, handle):
                waiting[server] = math.inf
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        now = time.monotonic()
        for server in list(waiting):
            if waiting[server] == math.inf and _left(server):
                waiting[server] = now + EXIT_GRACE
            if processes.gone(server.pid) or now > waiting[server]:
                del waiting[server]
        time.sleep(0.01 if waiting else 0)
    for server in servers:
        unregister(server.path, server.pid)


def is_board_server(server: BoardServer) -> bool:
    """Whether `server` is proven to be what it says: a valid entry, and process `server.pid` is
    this user's, runs ``python -m trainer.board`` on `server.path` and answers on `server.port` as
    the server of that folder."""
    if not _valid(server):
        return False
    facts = processes.process_facts(server.pid)
    if facts is None:
        return False
    uids, argv, cwd = facts
    if hasattr(os, "getuid") and any(uid != os.getuid() for uid in uids):
        return False
    return processes.serves(argv, cwd, server.path, server.port) and server.answers()


def _valid(server: BoardServer) -> bool:
    """Whether the fields of `server` have the types and values of an entry this module writes."""
    if any(type(getattr(server, name)) is not kind for name, kind in _FIELDS.items()):
        return False
    path = server.path
    return (
        server.pid > 0
        and 0 < server.port <= 0xFFFF
        and server.url == server_url(server.host, server.port)
        and "\0" not in path
        and os.path.isabs(path)
        and os.path.realpath(path) == path
        and os.path.isdir(path)
        and os.access(path, os.R_OK | os.X_OK)
    )


def register(server: BoardServer) -> Path:
    """Record `server` in the registry (`trainer.board.registry.write_entry`)."""
    return registry.write_entry(server.path, asdict(server))


def unregister(folder: str | os.PathLike, pid: int) -> None:
    """Remove the registry entry of `folder` if it is the one of process `pid`."""
    path = registry.entry_path(folder)
    entry = _read(path)
    if entry is not None and entry.pid == pid:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _read(path: Path) -> BoardServer | None:
    """The entry in registry file `path`; None where there is none, or it is not a valid entry
    (wrong fields, filed under another folder's key), which is then removed."""
    entry = registry.read_entry(path)
    if entry is None:
        return None
    if set(entry) == set(_FIELDS):
        server = BoardServer(**entry)
        if _valid(server) and registry.entry_path(server.path) == path:
            return server
    registry.discard(path)
    return None


def find(folder: str | os.PathLike) -> BoardServer | None:
    """The live server on `folder`, or None (a stale or invalid entry is removed).

    Raises:
        PermissionError: the registry folder is not private (`trainer.board.registry.private_registry_dir`).
    """
    registry.private_registry_dir()
    path = registry.entry_path(folder)
    server = _read(path)
    if server is None:
        return None
    if not processes.gone(server.pid) and is_board_server(server):
        return server
    registry.discard(path)
    return None


def running() -> list[BoardServer]:
    """Every live server in the registry (stale and invalid entries are removed).

    Raises:
        PermissionError: the registry folder is not private (`trainer.board.registry.private_registry_dir`).
    """
    found = []
    for path in registry.entry_paths():
        server = _read(path)
        if server is not None and find(server.path) == server:
            found.append(server)
    return found


def _failure(folder: Path, log: IO[str], status: int | None) -> OSError:
    """The error of a server that ended before it answered, from its output in `log`."""
    log.seek(0)
    lines = [line for line in log.read().splitlines() if line.strip()]
    if lines and lines[-1].startswith("error: "):  # its own one-line error names the folder
        return OSError(lines[-1].removeprefix("error: "))
    return OSError(
        f"TensorBoard could not serve {os.fspath(folder)!r}: {lines[-1] if lines else f'exit status {status}'}"
    )


def spawn(folder: str | os.PathLike, port: int | None = None, host: str = "127.0.0.1") -> BoardServer:
    """Start ``python -m trainer.board folder`` in the background, in its own session (a kernel
    interrupt or restart does not reach it), and return it once it answers.

    Raises:
        PermissionError: the registry folder is not private (`trainer.board.registry.private_registry_dir`).
        OSError: it could not serve (its one-line error), or did not answer in `START_TIMEOUT` s.
    """
    folder = Path(folder).resolve()
    package_root = os.fspath(Path(__file__).resolve().parents[2])  # this checkout's `trainer`
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    # The server's output, in a private file (0600, no name on Linux) in the private registry folder.
    with tempfile.TemporaryFile(mode="w+", dir=registry.private_registry_dir(), prefix="log-") as log:
        command = [sys.executable, "-m", processes.MODULE, os.fspath(folder), "--host", host]
        if port is not None:
            command += ["--port", str(port)]
        child = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True
        )
        processes.adopt(child)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            server = _read(registry.entry_path(folder))
            if server is not None and server.pid == child.pid and server.answers():
                return server
            if processes.gone(child.pid):
                raise _failure(folder, log, child.wait())
            time.sleep(0.05)
        child.terminate()
        raise OSError(f"TensorBoard did not answer within {START_TIMEOUT:.0f} s for {os.fspath(folder)!r}")
