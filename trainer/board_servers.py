"""The TensorBoard servers of `trainer.board.show`: one background process per folder, recorded in
a registry so that later calls, re-runs of a notebook cell and a restarted kernel find it again.

Every ``python -m trainer.board`` process records itself while it serves: one small JSON file per
folder in `registry_dir` (the user's temporary folder, ``trainer-board-servers-<uid>``), keyed by the
folder's resolved path, removed when the process ends (Ctrl-C, SIGTERM, SIGHUP or an error). An
entry whose process is gone, or whose port no longer serves that folder (a killed process, a reused
pid), is ignored and removed on sight.

The registry is safe on a machine shared with other users. Its folder is made private (mode 0700)
and checked before each use: one that belongs to another user, that others can write in, or that is
a symbolic link is refused with a one-line `PermissionError` saying what to do. Entries are written
private (0600) and checked when read: a file that is not a regular file of this user, not JSON, or
whose fields have the wrong types or values (a pid > 0, a port from 1 to 65535, a URL of that host
and port, an existing folder this user can read, filed under its own key) is ignored and removed.
A process is stopped only once it is proven to be the server of its entry: this user's process,
running ``python -m trainer.board`` on that folder (its command line), whose port answers as the
server of that folder; never a bare pid from a file. On Linux the signal goes through a pidfd
opened before the check, so a pid reused in between is never signalled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import select
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

#: How long `spawn` waits for a new server to answer; TensorBoard starts in a few seconds.
START_TIMEOUT = 120.0
#: The largest registry entry read (an entry is about 200 bytes).
MAX_ENTRY_BYTES = 64 * 1024
#: Where the command line, owner and working folder of a process are read (Linux); elsewhere ``ps``.
PROC = Path("/proc")
_FIELDS = {"path": str, "pid": int, "port": int, "host": str, "url": str}
_children: dict[int, subprocess.Popen] = {}  # servers this process started, reaped when stopped


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


def entry_path(folder: str | os.PathLike) -> Path:
    """The registry file of the server on `folder` (by its resolved path)."""
    key = hashlib.sha1(os.fspath(Path(folder).resolve()).encode()).hexdigest()[:16]
    return registry_dir() / f"{key}.json"


def server_url(host: str, port: int) -> str:
    """The address TensorBoard gives a server bound to `host`:`port` (an IPv6 host in brackets)."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{int(port)}/"


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
                environment = json.loads(response.read(MAX_ENTRY_BYTES).decode())
        except (OSError, ValueError):
            return False
        return isinstance(environment, dict) and environment.get("data_location") == self.path

    def stop(self, timeout: float = 10.0) -> None:
        """End the server (SIGTERM: it removes its temporary files and registry entry) and wait
        until it is gone; safe to call more than once. Only a process proven to be this server is
        signalled (see the module's notes); any other is left alone."""
        with _process_handle(self.pid) as handle:  # held from the check to the signal: the pid cannot be reused
            if _alive(self.pid) and is_board_server(self):
                _terminate(self.pid, handle, timeout)
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


@contextlib.contextmanager
def _process_handle(pid: int) -> Iterator[int | None]:
    """A pidfd of process `pid` (Linux), which always names that process, or None."""
    handle = None
    if hasattr(os, "pidfd_open"):
        with contextlib.suppress(OSError):
            handle = os.pidfd_open(pid)
    try:
        yield handle
    finally:
        if handle is not None:
            os.close(handle)


def _terminate(pid: int, handle: int | None, timeout: float) -> None:
    """SIGTERM to process `pid` (through its pidfd `handle` where there is one), then wait up to
    `timeout` seconds until it has ended."""
    try:
        if handle is not None:
            signal.pidfd_send_signal(handle, signal.SIGTERM)
        else:
            os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle is None:
            if not _alive(pid):
                return
            time.sleep(0.05)
        elif select.select([handle], [], [], 0.05)[0]:  # readable: the process has ended
            _alive(pid)  # reaps it if it is our own child
            return


def _process(pid: int) -> tuple[list[int], list[str], str | None] | None:
    """The real and effective uid, the command line and the working folder (None where unknown) of
    process `pid`; None where they cannot be read (it is gone, or they are not readable)."""
    if PROC.is_dir():
        folder = PROC / str(pid)
        try:
            argv = [os.fsdecode(arg) for arg in (folder / "cmdline").read_bytes().split(b"\0")[:-1]]
            status = (folder / "status").read_text()
            cwd = os.readlink(folder / "cwd")
            uids = next(line.split()[1:3] for line in status.splitlines() if line.startswith("Uid:"))
            return [int(uid) for uid in uids], argv, cwd
        except (OSError, ValueError, StopIteration):
            return None
    # No /proc (macOS, BSD): ps gives the command line joined by spaces and no working folder, so a
    # server on a path with spaces, or started with a relative path, cannot be proven there.
    try:
        answer = subprocess.run(
            ["ps", "-ww", "-o", "ruid=", "-o", "uid=", "-o", "args=", "-p", str(pid)],
            capture_output=True,
            text=True,
            timeout=10,
        )
        fields = answer.stdout.split()
        return ([int(fields[0]), int(fields[1])], fields[2:], None) if answer.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _module_arguments(argv: list[str]) -> list[str] | None:
    """The arguments after ``-m trainer.board`` where `argv` is a Python command line that runs that
    module (only interpreter options before it, such as ``-u`` or ``-X dev``); None otherwise."""
    if not argv or not os.path.basename(argv[0]).startswith("python"):
        return None
    index = 1
    while index < len(argv):
        token = argv[index]
        if token == "-m":
            return argv[index + 2 :] if argv[index + 1 : index + 2] == ["trainer.board"] else None
        if token in ("-X", "-W"):
            index += 2
        elif token.startswith(("-X", "-W")) or re.fullmatch(r"-[bBdEiIOPqsSuvR]+", token):
            index += 1
        else:
            return None  # a script, -c or an unknown option: not the module
    return None


def _serves(argv: list[str], cwd: str | None, path: str, port: int) -> bool:
    """Whether command line `argv`, run in folder `cwd`, is ``python -m trainer.board`` on `path`
    (and on `port`, where it names one)."""
    arguments = _module_arguments(argv)
    if arguments is None:
        return False
    folders, ports = [], []
    remaining = iter(arguments)
    for argument in remaining:
        name, equals, value = argument.partition("=")
        if name in ("--port", "--host"):
            value = value if equals else next(remaining, "")
            if name == "--port":
                ports.append(value)
        elif argument.startswith("-"):
            return False  # not a command line of ours: unprovable
        else:
            folders.append(argument)
    if len(folders) != 1 or (not os.path.isabs(folders[0]) and cwd is None):
        return False
    try:
        if any(int(value) not in (0, port) for value in ports):
            return False
    except ValueError:
        return False
    return os.path.realpath(os.path.join(cwd or "/", folders[0])) == path


def is_board_server(server: BoardServer) -> bool:
    """Whether `server` is proven to be what it says: a valid entry, and process `server.pid` is
    this user's, runs ``python -m trainer.board`` on `server.path` and answers on `server.port` as
    the server of that folder."""
    if not _valid(server):
        return False
    process = _process(server.pid)
    if process is None:
        return False
    uids, argv, cwd = process
    if hasattr(os, "getuid") and any(uid != os.getuid() for uid in uids):
        return False
    return _serves(argv, cwd, server.path, server.port) and server.answers()


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
    """Record `server` in the registry: a private (0600) file, written atomically (a reader never
    sees half a file), in the checked `private_registry_dir`."""
    private_registry_dir()
    path = entry_path(server.path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | nofollow, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(json.dumps(asdict(server)))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
    return path


def unregister(folder: str | os.PathLike, pid: int) -> None:
    """Remove the registry entry of `folder` if it is the one of process `pid`."""
    path = entry_path(folder)
    entry = _read(path)
    if entry is not None and entry.pid == pid:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _discard(path: Path) -> None:
    """Remove registry file `path` if it is this user's (another's is left: it cannot be ours)."""
    with contextlib.suppress(OSError):
        if not hasattr(os, "getuid") or os.lstat(path).st_uid == os.getuid():
            path.unlink()


def _read(path: Path) -> BoardServer | None:
    """The entry in registry file `path`; None where there is none, or it is not a valid entry (a
    symbolic link, another user's file, not JSON, wrong fields, filed under another folder's key),
    which is then removed."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError:  # a symbolic link, or unreadable
        _discard(path)
        return None
    with os.fdopen(descriptor, "rb") as file:
        info = os.fstat(file.fileno())
        ours = not hasattr(os, "getuid") or info.st_uid == os.getuid()
        data = file.read(MAX_ENTRY_BYTES + 1) if stat.S_ISREG(info.st_mode) and ours else b""
    try:
        entry = json.loads(data)
    except ValueError:
        entry = None
    if isinstance(entry, dict) and set(entry) == set(_FIELDS):
        server = BoardServer(**entry)
        if _valid(server) and entry_path(server.path) == path:
            return server
    _discard(path)
    return None


def find(folder: str | os.PathLike) -> BoardServer | None:
    """The live server on `folder`, or None (a stale or invalid entry is removed).

    Raises:
        PermissionError: the registry folder is not private (`private_registry_dir`).
    """
    private_registry_dir()
    path = entry_path(folder)
    server = _read(path)
    if server is None:
        return None
    if _alive(server.pid) and is_board_server(server):
        return server
    _discard(path)
    return None


def running() -> list[BoardServer]:
    """Every live server in the registry (stale and invalid entries are removed).

    Raises:
        PermissionError: the registry folder is not private (`private_registry_dir`).
    """
    found = []
    for path in sorted(private_registry_dir().glob("*.json")):
        server = _read(path)
        if server is not None and find(server.path) == server:
            found.append(server)
    return found


def spawn(folder: str | os.PathLike, port: int | None = None, host: str = "127.0.0.1") -> BoardServer:
    """Start ``python -m trainer.board folder`` in the background, in its own session (a kernel
    interrupt or restart does not reach it), and return it once it answers.

    Raises:
        PermissionError: the registry folder is not private (`private_registry_dir`).
        OSError: it could not serve (its one-line error), or did not answer in `START_TIMEOUT` s.
    """
    folder = Path(folder).resolve()
    package_root = os.fspath(Path(__file__).resolve().parent.parent)  # this checkout's `trainer`
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    # The server's output, in a private file (0600, no name on Linux) in the private registry folder.
    with tempfile.TemporaryFile(mode="w+", dir=private_registry_dir(), prefix="log-") as log:
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
