"""Open TensorBoard on a run directory (or a folder of runs), from the shell or a notebook.

From the shell::

    python -m trainer.board runs/nested_unet            # prints the URL, serves until Ctrl-C or SIGTERM
    python -m trainer.board runs --port 6006 --host 127.0.0.1

From a notebook::

    trainer.board.show("runs/nested_unet")   # inline; one server per folder, reused by later calls
    trainer.board.stop("runs/nested_unet")   # or trainer.board.stop_all()

From Python, a server in this process::

    board = trainer.board.start("runs")    # serves in the background; board.url, board.port
    board.stop()

The server is TensorBoard's own (`tensorboard.program.TensorBoard`). It reads event files with
the pure-Python loader (``--load_fast=false``), so nothing else is spawned, and `Board.stop` shuts
the HTTP server down, frees its port and ends the reload loop. `show` runs it as a background
``python -m trainer.board`` process recorded in a registry (`trainer.board_servers`), so that a
later call, a re-run of the cell or a restarted kernel finds it again; see `show` for what the
cell shows and `trainer.board_frontends` for the address each notebook frontend needs.

Runs are named as TensorBoard names them in a folder of runs, by their paths relative to it
(``nested_unet/20261127-101500``). A single run directory (one that holds event files itself) is
named after its folder (``20261127-101500``), in the legend, the tooltips and the HParams tab,
rather than TensorBoard's ``.``: TensorBoard is pointed at a temporary folder holding one
symbolic link to the run, named like it (``--logdir_spec`` would name it ``20261127-101500/.``),
removed when the server stops. TensorBoard's "data location" still names the run directory.

A resumed run shows as one curve per tag, as plain ``tensorboard`` shows it: this loader drops a
killed process's orphaned points only at a run's second restart marker (``SessionLog.START``),
taking the first for the run's start, so every event stream the TensorBoard callbacks write
begins with one (`trainer.callbacks.tensorboard.TensorBoardWriterCallback`). Runs written
without it (by other tools, or by this project before it wrote one) can still show a resumed
stretch twice here.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gzip
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.board_servers import BoardServer

#: The names of TensorBoard's event files (a glob pattern).
EVENT_FILE_PATTERN = "events.out.tfevents.*"


def find_event_files(path: str | os.PathLike) -> list[Path]:
    """Every TensorBoard event file (``events.out.tfevents.*``) in or below `path`, sorted."""
    root = Path(path)
    if root.is_file():
        return [root] if root.match(EVENT_FILE_PATTERN) else []
    return sorted(p for p in root.rglob(EVENT_FILE_PATTERN) if p.is_file())


def check_logdir(path: str | os.PathLike) -> Path:
    """`path` as a `Path` if it holds event files; else a one-line error naming it.

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


class Board:
    """A TensorBoard server running in the background on `path`; `stop()` shuts it down.

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
        server.shutdown()  # returns once serve_forever has left its loop
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


def _end_reloading(ingester: Any) -> None:
    # TensorBoard has no public way to end its reload thread; a zero interval makes the loop
    # exit after its current sleep instead of reloading the logs for the life of the process.
    if hasattr(ingester, "_reload_interval"):
        ingester._reload_interval = 0


def holds_events(path: Path) -> bool:
    """Whether `path` itself (not a folder below it) holds event files: it is a run."""
    return any(p.is_file() for p in path.glob(EVENT_FILE_PATTERN))


def run_name(path: str | os.PathLike) -> str:
    """The name a single run directory gets: its folder's name."""
    return Path(path).resolve().name or "run"


def _link_run(root: Path) -> str | None:
    """A temporary folder holding one symbolic link to the run `root`, named `run_name(root)`,
    removed when the process exits; None where links cannot be made (the run is then named ``.``).
    The folder is private: `tempfile.mkdtemp` makes it with mode 0700 under a random name that no
    other user can take first."""
    links = tempfile.mkdtemp(prefix="trainer-board-")
    try:
        os.symlink(root.resolve(), os.path.join(links, run_name(root)), target_is_directory=True)
    except (OSError, NotImplementedError):
        shutil.rmtree(links, ignore_errors=True)
        return None
    atexit.register(_remove_links, links)
    return links


def _remove_links(links: str | None) -> None:
    if links is None or not os.path.isdir(links):
        return
    with contextlib.suppress(OSError):
        for entry in os.listdir(links):  # the link only, never what it points to
            os.unlink(os.path.join(links, entry))
        os.rmdir(links)


def _reporting_location(app: Any, location: str) -> Any:
    """`app` (TensorBoard's WSGI app) with ``data/environment`` naming `location` as its data
    location, instead of the temporary folder of links that TensorBoard reads."""

    def wrapped(environ: dict, start_response: Any) -> Any:
        if not environ.get("PATH_INFO", "").endswith("/data/environment"):
            return app(environ, start_response)
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
                body = json.dumps({**json.loads(body), "data_location": location}).encode()
            headers["content-length"] = ("Content-Length", str(len(body)))
        start_response(answer["status"], list(headers.values()))
        return [body]

    return wrapped


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
        if links is not None:
            wsgi_app = _reporting_location(wsgi_app, os.fspath(root.resolve()))
        server = program.create_port_scanning_werkzeug_server(wsgi_app, flags)
        servers.append(server)
        return server

    with warnings.catch_warnings():
        # Loading the default plugins imports a vendored html5lib that warns on import.
        warnings.simplefilter("ignore", DeprecationWarning)
        tensorboard = program.TensorBoard(server_class=make_server)
    links = _link_run(root) if holds_events(root) else None
    tensorboard.configure(
        argv=[
            None,
            "--logdir",
            links or os.fspath(root),
            "--host",
            host,
            "--port",
            str(port or 0),  # 0: the OS picks a free port
            "--load_fast",
            "false",  # in-process loader: no data-server subprocess to manage
        ]
    )
    try:
        url = tensorboard.launch()
    except (program.TensorBoardServerException, OSError) as exc:
        _end_reloading(getattr(tensorboard, "_ingester", None))
        _remove_links(links)
        reason = getattr(exc, "msg", None) or str(exc)
        raise OSError(f"TensorBoard could not serve {os.fspath(path)!r} on {host}:{port}: {reason}") from exc
    server = servers[-1]
    return Board(root, url, server.server_port, host, server, getattr(tensorboard, "_ingester", None), links)


def show(
    path: str | os.PathLike,
    height: int = 800,
    port: int | None = None,
    host: str = "127.0.0.1",
    proxy_url: str | None = None,
) -> BoardServer:
    """Show TensorBoard on `path` in a notebook cell (outside a notebook: print its address).

    One server per folder: the first call starts ``python -m trainer.board path`` in the
    background; later calls, re-runs of the cell and calls after a kernel restart reuse it while
    it answers. `stop` or `stop_all` end it. In a notebook the cell holds a picture of the run (its
    loss curves and latest figure, as an embedded PNG, so a saved notebook reads on GitHub and
    nbviewer) and, where the browser reaches the server, the live TensorBoard in place of it.
    Where it does not (server stopped, kernel gone, notebook reopened elsewhere), the cell says
    what to run. The address follows the frontend (`trainer.board_frontends.frontend`): Jupyter
    on this machine, Jupyter behind jupyter-server-proxy or JupyterHub, ``TENSORBOARD_PROXY_URL``,
    VS Code, Colab, or `proxy_url`.

    Args:
        path: a run directory or a folder of runs; it must hold event files.
        height: the height of the TensorBoard frame, in pixels.
        port: the port for a new server (None: a free one); an answering server keeps its own.
        host: the address a new server binds (loopback by default).
        proxy_url: the address the browser reaches the server at, with ``%PORT%`` for its port
            (``https://example.org/tb/%PORT%/``); default: from the frontend.

    Returns:
        the server (``url``, ``port``, ``pid``, ``stop()``).

    Raises:
        FileNotFoundError, ValueError: `path` is missing or holds no event files, or `proxy_url`
            has no ``%PORT%``.
        PermissionError: the registry folder is not private (another user's, or open to others;
            `trainer.board_servers.private_registry_dir`).
        OSError: a new server could not serve.
    """
    from trainer import board_frontends, board_servers
    from trainer.notebook import in_notebook

    root = check_logdir(path).resolve()
    if height <= 0:
        raise ValueError(f"height must be a positive number of pixels, got {height!r}")
    board_frontends.frontend(0, proxy_url)  # a bad proxy_url or TENSORBOARD_PROXY_URL fails before a server starts
    server = board_servers.find(root) or board_servers.spawn(root, port=port, host=host)
    target = board_frontends.frontend(server.port, proxy_url)
    if not in_notebook():
        print(f"TensorBoard on {server.path}: {target.url or server.url}")
        return server
    from IPython.display import display

    from trainer.board_snapshot import snapshot_png

    display(board_frontends.cell_output(server, target, height, snapshot_png(root)), raw=True)
    return server


def stop(path: str | os.PathLike) -> bool:
    """End the server `show` started on `path`; returns whether one was running. Only a process
    proven to be that server is stopped (`trainer.board_servers.is_board_server`).

    Raises:
        PermissionError: the registry folder is not private.
    """
    from trainer import board_servers

    server = board_servers.find(Path(path).resolve())
    if server is None:
        return False
    server.stop()
    return True


def stop_all() -> int:
    """End every server `show` (or ``python -m trainer.board``) of this user runs; returns how many.
    Only processes proven to be those servers are stopped (`trainer.board_servers.is_board_server`).

    Raises:
        PermissionError: the registry folder is not private.
    """
    from trainer import board_servers

    servers = board_servers.running()
    for server in servers:
        server.stop()
    return len(servers)


def main(argv: list[str] | None = None) -> int:
    """Command line: serve TensorBoard on a run directory until Ctrl-C, SIGTERM or SIGHUP, recorded
    in the registry of `trainer.board_servers` meanwhile; returns the exit code."""
    from trainer import board_servers

    parser = argparse.ArgumentParser(
        prog="python -m trainer.board",
        description="Open TensorBoard on a run directory or a folder of runs.",
    )
    parser.add_argument("path", help="a run directory or a folder of runs holding event files")
    parser.add_argument("--port", type=int, default=None, help="port to serve on (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    args = parser.parse_args(argv)
    stopping = threading.Event()
    handlers = {}
    for name in ("SIGTERM", "SIGHUP"):  # a plain kill or a closed terminal: clean up as for Ctrl-C
        if hasattr(signal, name):
            handlers[name] = signal.signal(getattr(signal, name), lambda *_: stopping.set())
    try:
        try:
            board_servers.private_registry_dir()  # a registry another user could plant in: refused before serving
            board = start(args.path, port=args.port, host=args.host)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        path = os.fspath(board.path.resolve())
        board_servers.register(board_servers.BoardServer(path, os.getpid(), board.port, board.host, board.url))
        try:
            print(f"TensorBoard on {os.fspath(board.path)}: {board.url}", flush=True)
            while not stopping.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            board_servers.unregister(path, os.getpid())
            board.stop()
    finally:
        for name, handler in handlers.items():
            signal.signal(getattr(signal, name), handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
