"""What the board knows of a process: whether it is gone, its owner and command line, whether that
command line serves a folder, and how it is signalled without ever reaching a reused pid.

A process that has ended but whose parent has not reaped it yet (a zombie: its parent is a live
kernel that started it) counts as gone: it serves nothing and holds no port.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

#: Where the command line, owner and working folder of a process are read (Linux); elsewhere ``ps``.
PROC = Path("/proc")
#: The module a server runs (``python -m trainer.board``).
MODULE = "trainer.board"
_children: dict[int, subprocess.Popen] = {}  # servers this process started


def adopt(child: subprocess.Popen) -> None:
    """Reap `child`, a server this process started, as soon as it ends (a thread waits for it), so
    that it never stays a zombie while this process (a notebook's kernel) lives on."""
    _children[child.pid] = child
    threading.Thread(target=child.wait, name=f"reap board server {child.pid}", daemon=True).start()


def _zombie(pid: int) -> bool:
    """Whether process `pid` has ended and waits for its parent to reap it (Linux; else False)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].startswith(("Z", "X"))


def gone(pid: int) -> bool:
    """Whether process `pid` has ended (a zombie counts as ended)."""
    child = _children.get(pid)
    if child is not None and child.returncode is not None:  # our own, reaped: its pid may be reused
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, but another user's
        return False
    if not _zombie(pid):
        return False
    if child is not None:  # ours: reaped by its thread in a moment
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(1.0)
    return True


@contextlib.contextmanager
def process_handle(pid: int) -> Iterator[int | None]:
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


def send_stop(pid: int, handle: int | None) -> bool:
    """SIGTERM to process `pid`, through its pidfd `handle` where there is one; False if it is gone."""
    try:
        if handle is not None:
            signal.pidfd_send_signal(handle, signal.SIGTERM)
        else:
            os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True


def process_facts(pid: int) -> tuple[list[int], list[str], str | None] | None:
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
            return argv[index + 2 :] if argv[index + 1 : index + 2] == [MODULE] else None
        if token in ("-X", "-W"):
            index += 2
        elif token.startswith(("-X", "-W")) or re.fullmatch(r"-[bBdEiIOPqsSuvR]+", token):
            index += 1
        else:
            return None  # a script, -c or an unknown option: not the module
    return None


def serves(argv: list[str], cwd: str | None, path: str, port: int) -> bool:
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
