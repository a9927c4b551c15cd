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

The server is TensorBoard's own (`trainer.board.server`). `show` runs it as a background
``python -m trainer.board`` process recorded in a registry (`trainer.board.registry`,
`trainer.board.servers`), so that a later call, a re-run of the cell or a restarted kernel finds it
again; see `show` for what the cell shows (`trainer.board.cell`, `trainer.board.snapshot`) and
`trainer.board.frontends` for the address each notebook frontend needs. The server process loads
neither torch nor the trainer's training code: only this package, `trainer.event_files` and
TensorBoard.

Runs are named as TensorBoard names them in a folder of runs, by their paths relative to it
(``nested_unet/20261127-101500``). A single run directory (one that holds event files itself) is
named after its folder (``20261127-101500``), in the legend, the tooltips and the HParams tab,
rather than TensorBoard's ``.``. TensorBoard's "data location" still names the run directory.

A resumed run shows as one curve per tag, as plain ``tensorboard`` shows it: this loader drops a
killed process's orphaned points only at a run's second restart marker (``SessionLog.START``),
taking the first for the run's start, so every event stream the TensorBoard callbacks write
begins with one (`trainer.callbacks.tensorboard.TensorBoardWriterCallback`). Runs written
without it (by other tools, or by this project before it wrote one) can still show a resumed
stretch twice here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.board.server import Board, check_logdir, start

if TYPE_CHECKING:
    from trainer.board.servers import BoardServer

__all__ = ["Board", "check_logdir", "show", "start", "stop", "stop_all"]

#: The height of the live TensorBoard frame in a notebook cell, in pixels.
DEFAULT_HEIGHT = 1000


def show(
    path: str | os.PathLike,
    height: int = DEFAULT_HEIGHT,
    port: int | None = None,
    host: str = "127.0.0.1",
    proxy_url: str | None = None,
) -> BoardServer:
    """Show TensorBoard on `path` in a notebook cell (outside a notebook: print its address).

    One server per folder: the first call starts ``python -m trainer.board path`` in the
    background; later calls, re-runs of the cell and calls after a kernel restart reuse it while
    it answers. `stop` or `stop_all` end it. In a notebook the cell holds a picture of the run (its
    loss curves and latest figure, embedded once as a PNG, so a saved notebook reads on GitHub and
    nbviewer; drawn again only when the run's event files change) and, where the browser reaches
    the server, the live TensorBoard in place of it, with a link to open it in a new tab. Where it
    does not (server stopped, kernel gone), the cell says what to run, with `path` as given. The
    address follows the frontend (`trainer.board.frontends.frontend`): Jupyter on this machine or
    through an SSH tunnel, Jupyter behind jupyter-server-proxy or JupyterHub,
    ``TENSORBOARD_PROXY_URL``, VS Code, Colab, or `proxy_url`.

    Args:
        path: a run directory or a folder of runs; it must hold event files.
        height: the height of the TensorBoard frame, in pixels.
        port: the port for a new server (None: a free one); an answering server keeps its own.
        host: the address a new server binds (loopback by default).
        proxy_url: the address the browser reaches the server at, with ``%PORT%`` for its port
            (``https://example.org/tb/%PORT%/``); default: from the frontend.

    Returns:
        the server (``url``, ``port``, ``pid``, ``stop()``); as a cell's last line it prints nothing.

    Raises:
        FileNotFoundError, ValueError: `path` is missing or holds no event files, or `proxy_url`
            has no ``%PORT%``.
        PermissionError: the registry folder is not private (another user's, or open to others;
            `trainer.board.registry.private_registry_dir`).
        OSError: a new server could not serve.
    """
    from trainer.board import frontends, servers
    from trainer.board.notebook import in_notebook

    root = check_logdir(path).resolve()
    if height <= 0:
        raise ValueError(f"height must be a positive number of pixels, got {height!r}")
    frontends.frontend(0, proxy_url)  # a bad proxy_url or TENSORBOARD_PROXY_URL fails before a server starts
    server = servers.find(root) or servers.spawn(root, port=port, host=host)
    target = frontends.frontend(server.port, proxy_url)
    if not in_notebook():
        print(f"TensorBoard on {os.fspath(path)}: {target.url or server.url}")
        return server
    from IPython.display import display

    from trainer.board.cell import cell_output
    from trainer.board.snapshot import snapshot

    picture = snapshot(root)
    display(cell_output(server, target, height, picture.png, os.fspath(path), picture.points), raw=True)
    return server


def stop(path: str | os.PathLike) -> bool:
    """End the server `show` started on `path`; returns whether one was running. Only a process
    proven to be that server is stopped (`trainer.board.servers.is_board_server`). Folders of links
    that killed servers left behind are removed, and the registry folder once it is empty.

    Args:
        path: the run directory or folder of runs given to `show` (the same folder by another
            path also matches).

    Raises:
        PermissionError: the registry folder is not private.
    """
    from trainer.board import registry, servers
    from trainer.board.server import remove_stale_links

    server = servers.find(Path(path).resolve())
    if server is not None:
        server.stop()
    remove_stale_links()
    registry.remove_if_empty()
    return server is not None


def stop_all() -> int:
    """End every server `show` (or ``python -m trainer.board``) of this user runs, all at once;
    returns how many. Only processes proven to be those servers are stopped
    (`trainer.board.servers.is_board_server`). Folders of links that killed servers left behind are
    removed, and the registry folder once it is empty.

    Raises:
        PermissionError: the registry folder is not private.
    """
    from trainer.board import registry, servers
    from trainer.board.server import remove_stale_links

    found = servers.running()
    servers.stop_servers(found)
    remove_stale_links()
    registry.remove_if_empty()
    return len(found)
