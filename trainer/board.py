"""Open TensorBoard on a run directory (or a folder of runs), from the shell or a notebook.

From the shell::

    python -m trainer.board runs/nested_unet            # prints the URL, serves until Ctrl-C
    python -m trainer.board runs --port 6006 --host 127.0.0.1

From Python or a notebook::

    board = trainer.board.start("runs")    # serves in the background; board.url, board.port
    board.stop()
    trainer.board.show("runs")             # the same, displayed inline in Jupyter

The server is TensorBoard's own (`tensorboard.program.TensorBoard`), run in this process. It
reads event files with the pure-Python loader (``--load_fast=false``), so nothing else is
spawned, and `Board.stop` shuts the HTTP server down, frees its port and ends the reload loop.

Runs are named as TensorBoard names them in a folder of runs, by their paths relative to it
(``nested_unet/20261127-101500``). A single run directory (one that holds event files itself) is
named after its folder (``20261127-101500``), in the legend, the tooltips and the HParams tab,
rather than TensorBoard's ``.``: TensorBoard is pointed at a temporary folder holding one
symbolic link to the run, named like it (``--logdir_spec`` would name it ``20261127-101500/.``).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import shutil
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

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

    def __init__(self, path: Path, url: str, port: int, host: str, server: Any, ingester: Any) -> None:
        self.path = path
        self.url = url
        self.port = port
        self.host = host
        self._server = server
        self._ingester = ingester
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        """Whether the server is still serving."""
        return self._server is not None

    def stop(self) -> None:
        """Shut the server down and free its port; safe to call more than once."""
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()  # returns once serve_forever has left its loop
        server.server_close()
        _end_reloading(self._ingester)  # its last reload may still read the run through the link

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
    removed when the process exits; None where links cannot be made (the run is then named ``.``)."""
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
            "--logdir", links or os.fspath(root),
            "--host", host,
            "--port", str(port or 0),  # 0: the OS picks a free port
            "--load_fast", "false",  # in-process loader: no data-server subprocess to manage
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
    return Board(root, url, server.server_port, host, server, getattr(tensorboard, "_ingester", None))


def show(
    path: str | os.PathLike, height: int = 800, port: int | None = None, host: str = "127.0.0.1"
) -> Board:
    """Start TensorBoard on `path` (see `start`) and display it inline in a notebook.

    With IPython available the page is shown in an ``IFrame`` of `height` pixels; without it
    the URL is printed. Returns the `Board`; call its ``stop()`` when done.
    """
    board = start(path, port=port, host=host)
    try:
        from IPython.display import IFrame, display
    except ImportError:
        print(f"TensorBoard on {os.fspath(board.path)}: {board.url}")
    else:
        display(IFrame(board.url, width="100%", height=height))
    return board


def main(argv: list[str] | None = None) -> int:
    """Command line: serve TensorBoard on a run directory until Ctrl-C; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m trainer.board",
        description="Open TensorBoard on a run directory or a folder of runs.",
    )
    parser.add_argument("path", help="a run directory or a folder of runs holding event files")
    parser.add_argument("--port", type=int, default=None, help="port to serve on (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    args = parser.parse_args(argv)
    try:
        board = start(args.path, port=args.port, host=args.host)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"TensorBoard on {os.fspath(board.path)}: {board.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        board.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
