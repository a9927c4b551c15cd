"""TensorBoard's own server (`tensorboard.program.TensorBoard`) on a run directory or a folder of
runs, in this process: `start` returns a `Board` whose `stop` shuts it down.

It reads event files with the pure-Python loader (``--load_fast=false``), so nothing else is
spawned, and `Board.stop` shuts the HTTP server down, frees its port and ends the reload loop.

A single run directory (one that holds event files itself) is named after its folder
(``20261127-101500``) rather than TensorBoard's ``.``: TensorBoard is pointed at a temporary
folder of links, ``trainer-board-links-<pid>-XXXXXXXX``, holding one symbolic link to the run,
named like it, removed when the server stops. A folder left by a killed server (its pid gone) is
removed the next time a server starts or `trainer.board.stop_all` runs (`remove_stale_links`).

Besides TensorBoard's routes, the server answers ``trainer-board.json`` with the identity of the
folder it serves (`folder_id`) to any page, so that a notebook cell can tell it reached the server
of its folder and not some other page on that address; its ``data/environment`` names the folder
served (not the folder of links) as its data location.
"""

from __future__ import annotations

import atexit
import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from trainer.board.processes import gone
from trainer.event_files import EVENT_FILE_PATTERN, find_event_files, holds_events

#: The route (under the server's address) that names the folder it serves, readable by any page.
IDENTITY_ROUTE = "trainer-board.json"
_LINKS_PREFIX = "trainer-board-links-"


def check_logdir(path: str | os.PathLike) -> Path:
    """`path` as a `Path` if it holds event files; else a one-line error naming it.

    Args:
        path: a run directory or a folder of runs.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: `path` is not a directory or holds no event files.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(
            f"{os.fspath(path)!r} does not exist, so it holds no TensorBoard event files "
            f"({EVENT_FILE_PATTERN}); give a run directory or a folder of runs"
        )
    if not root.is_dir():
        raise ValueError(
            f"{os.fspath(path)!r} is a file, not a directory; give the run directory that holds "
            "the TensorBoard event files, or a folder of runs"
        )
    if not find_event_files(root):
        raise ValueError(
            f"{os.fspath(path)!r} holds no TensorBoard event files ({EVENT_FILE_PATTERN}) "
            "in it or below it; give a run directory or a folder of runs"
        )
    return root


def folder_id(path: str | os.PathLike) -> str:
    """The identity of the folder a server serves, as ``trainer-board.json`` gives it: a digest of
    its resolved path (the path itself is not given to other pages)."""
    return hashlib.sha256(os.fspath(Path(path).resolve()).encode()).hexdigest()[:32]


class Board:
    """A TensorBoard server running in the background on `path`; `stop()` shuts it down. Made by
    `start`, not by hand.

    Args:
        path: the run directory or folder of runs it serves.
        url: where to open it.
        port: the TCP port it listens on.
        host: the address it is bound to.
        server: TensorBoard's server object, which `stop` shuts down.
        ingester: TensorBoard's data ingester, which `stop` ends.
        links: the temporary folder of links that names a single run after its folder, or None.

    Attributes:
        path: the run directory or folder of runs it serves.
        url: where to open it, e.g. ``http://127.0.0.1:6006/``.
        port: the TCP port it listens on.
        host: the address it is bound to.
    """

    def __init__(
        self, path: Path, url: str, port: int, host: str, server: Any, ingester: Any, links: str | None = None
    ) -> None:
        self.path = path
        self.url = url
        self.port = port
        self.host = host
        self._server = server
        self._ingester = ingester
        self._links = links
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        """Whether the server is still serving."""
        return self._server is not None

    def stop(self) -> None:
        """Shut the server down, free its port and remove its temporary folder; safe to call more
        than once."""
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return
        _shut_down(server)
        server.server_close()
        _end_reloading(self._ingester)  # its last reload may still read the run through the link
        _remove_links(self._links)

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"Board(path={os.fspath(self.path)!r}, url={self.url!r}, {state})"


def _shut_down(server: Any) -> None:
    """`server.shutdown()`, which returns once `serve_forever` has left its loop; that loop looks
    for the request only every half second, so connections wake it up at once."""
    stopper = threading.Thread(target=server.shutdown, name="stop TensorBoard", daemon=True)
    stopper.start()
    host, port = server.server_address[:2]
    while stopper.is_alive():
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.1):
            pass
        stopper.join(0.02)


def _end_reloading(ingester: Any) -> None:
    # TensorBoard has no public way to end its reload thread; a zero interval makes the loop
    # exit after its current sleep instead of reloading the logs for the life of the process.
    if hasattr(ingester, "_reload_interval"):
        ingester._reload_interval = 0


def run_name(path: str | os.PathLike) -> str:
    """The name a single run directory gets: its folder's name."""
    return Path(path).resolve().name or "run"


def _link_run(root: Path) -> str | None:
    """A temporary folder holding one symbolic link to the run `root`, named `run_name(root)`;
    None where links cannot be made (the run is then named ``.``). The folder is private:
    `tempfile.mkdtemp` makes it with mode 0700 under a random name that no other user can take
    first; its name holds this process's id, so that `remove_stale_links` knows when it is left over."""
    links = tempfile.mkdtemp(prefix=f"{_LINKS_PREFIX}{os.getpid()}-")
    try:
        os.symlink(root.resolve(), os.path.join(links, run_name(root)), target_is_directory=True)
    except (OSError, NotImplementedError):
        shutil.rmtree(links, ignore_errors=True)
        return None
    atexit.register(_remove_links, links)
    return links


def _remove_links(links: str | os.PathLike | None) -> None:
    if links is None or not os.path.isdir(links):
        return
    with contextlib.suppress(OSError):
        for entry in os.listdir(links):  # the links only, never what they point to
            os.unlink(os.path.join(links, entry))
        os.rmdir(links)


def remove_stale_links() -> int:
    """Remove the folders of links that servers killed before they could clean up left in the
    temporary folder (this user's, whose process is gone, holding nothing but links); returns how many."""
    removed = 0
    pattern = re.compile(rf"{re.escape(_LINKS_PREFIX)}(\d+)-")
    with contextlib.suppress(OSError):
        for entry in os.scandir(tempfile.gettempdir()):
            match = pattern.match(entry.name)
            if match is None or not entry.is_dir(follow_symlinks=False) or not gone(int(match.group(1))):
                continue
            with contextlib.suppress(OSError):
                inside = list(os.scandir(entry.path))
                ours = not hasattr(os, "getuid") or entry.stat(follow_symlinks=False).st_uid == os.getuid()
                if ours and all(e.is_symlink() for e in inside):
                    _remove_links(entry.path)
                    removed += not os.path.exists(entry.path)
    return removed


def _with_identity(app: Any, location: str) -> Any:
    """`app` (TensorBoard's WSGI app) that also answers `IDENTITY_ROUTE` (to any origin), and whose
    ``data/environment`` names `location` as its data location instead of a folder of links."""
    identity = json.dumps({"tensorboard": True, "folder": folder_id(location)}).encode()

    def wrapped(environ: dict, start_response: Any) -> Iterable[bytes]:
        route = environ.get("PATH_INFO", "")
        if route.endswith("/" + IDENTITY_ROUTE):
            start_response(
                "200 OK",
                [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(identity))),
                    ("Access-Control-Allow-Origin", "*"),
                    ("Cache-Control", "no-store"),
                ],
            )
            return [identity]
        if not route.endswith("/data/environment"):
            return app(environ, start_response)
        return _rewritten(app, environ, start_response, lambda data: {**data, "data_location": location})

    return wrapped


def _rewritten(app: Any, environ: dict, start_response: Any, change: Callable[[Any], Any]) -> list[bytes]:
    """`app`'s answer to `environ`, its JSON body passed through `change` when it is a 200."""
    answer: dict[str, Any] = {}

    def capture(status: str, headers: list, exc_info: Any = None) -> Any:
        answer.update(status=status, headers=headers)
        return lambda data: None

    body = b"".join(app(environ, capture))
    headers = dict((key.lower(), (key, value)) for key, value in answer["headers"])
    if answer["status"].startswith("200"):
        if headers.pop("content-encoding", ("", ""))[1] == "gzip":
            body = gzip.decompress(body)
        with contextlib.suppress(ValueError):
            body = json.dumps(change(json.loads(body))).encode()
        headers["content-length"] = ("Content-Length", str(len(body)))
    start_response(answer["status"], list(headers.values()))
    return [body]


def start(path: str | os.PathLike, port: int | None = None, host: str = "127.0.0.1") -> Board:
    """Start TensorBoard on `path` in the background and return its `Board`.

    A run directory is served as one run named after its folder; a folder of runs, as its runs,
    named by their paths relative to it.

    Args:
        path: a run directory or a folder of runs; it must hold event files.
        port: the port to serve on; None (the default) picks a free one.
        host: the address to bind; loopback by default, so only this machine can connect.

    Raises:
        FileNotFoundError, ValueError: `path` is missing or holds no event files.
        OSError: the server cannot bind to `host`:`port`.
    """
    root = check_logdir(path)
    if port is not None and not (isinstance(port, int) and 0 <= port <= 0xFFFF):
        raise ValueError(f"port must be an integer from 0 to 65535 (0 or None: any free port), got {port!r}")

    from tensorboard import program

    servers: list[Any] = []

    def make_server(wsgi_app: Any, flags: Any) -> Any:
        server = program.create_port_scanning_werkzeug_server(_with_identity(wsgi_app, location), flags)
        servers.append(server)
        return server

    with warnings.catch_warnings():
        # Loading the default plugins imports a vendored html5lib that warns on import.
        warnings.simplefilter("ignore", DeprecationWarning)
        tensorboard = program.TensorBoard(server_class=make_server)
    remove_stale_links()
    location = os.fspath(root.resolve())
    links = _link_run(root) if holds_events(root) else None
    # --load_fast false: the in-process loader, no data-server subprocess to manage; port 0: any free one.
    argv = ["--logdir", links or os.fspath(root), "--host", host, "--port", str(port or 0), "--load_fast", "false"]
    tensorboard.configure(argv=[None, *argv])
    try:
        url = tensorboard.launch()
    except (program.TensorBoardServerException, OSError) as exc:
        _end_reloading(getattr(tensorboard, "_ingester", None))
        _remove_links(links)
        reason = getattr(exc, "msg", None) or str(exc)
        raise OSError(f"TensorBoard could not serve {os.fspath(path)!r} on {host}:{port}: {reason}") from exc
    server = servers[-1]
    return Board(root, url, server.server_port, host, server, getattr(tensorboard, "_ingester", None), links)
