"""The script of a `trainer.board.show` cell, run by headless Chromium on pages served the ways a
notebook reaches a browser: from this machine, through an SSH tunnel (``ssh -L``: the page is on
``localhost`` but the TensorBoard port is not forwarded), and in a static viewer.

The server is a real TensorBoard (`trainer.board.start`). A small HTTP server plays the notebook
server as the browser sees it: it serves the page (the cell's HTML inside a page that carries
JupyterLab's configuration, or not, as a static viewer) and, where asked, forwards
``/proxy/PORT/...`` to the TensorBoard server as jupyter-server-proxy does. Chromium loads the page,
runs its scripts and prints the document as they left it. Needs Debian's ``chromium`` (skipped
where it is not installed).
"""

from __future__ import annotations

import http.server
import re
import shutil
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard.writer import FileWriter

from trainer import board
from trainer.board.cell import cell_output
from trainer.board.frontends import Frontend
from trainer.board.servers import BoardServer, server_url

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (Debian: apt-get install chromium)")
JUPYTER_CONFIG = '<script id="jupyter-config-data" type="application/json">{"baseUrl": "/"}</script>'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[board.Board]:
    run = tmp_path_factory.mktemp("runs") / "tiny"
    writer = FileWriter(str(run))
    for step in (1, 2):
        writer.add_summary(Summary(value=[Summary.Value(tag="Loss/training loss", simple_value=1.0 / step)]), step)
    writer.close()
    with board.start(run) as served:
        yield served


class NotebookServer(http.server.ThreadingHTTPServer):
    """The notebook server as the browser reaches it: ``/lab`` is the page; with `forward`,
    ``/proxy/<port>/...`` goes to ``127.0.0.1:<forward[port]>``; anything else is a 404. `paths`:
    every path asked for."""

    def __init__(self, page: str, forward: dict[int, int]) -> None:
        self.page, self.forward, self.paths = page, forward, []
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: NotebookServer

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        self.server.paths.append(self.path)
        match = re.fullmatch(r"/proxy/(\d+)(/.*)", self.path)
        if self.path == "/lab":
            self.answer(200, self.server.page.encode(), "text/html")
        elif match and int(match.group(1)) in self.server.forward:
            target = f"http://127.0.0.1:{self.server.forward[int(match.group(1))]}{match.group(2)}"
            try:
                with urllib.request.urlopen(target, timeout=10) as response:
                    self.answer(response.status, response.read(), response.headers.get_content_type())
            except urllib.error.HTTPError as error:
                self.answer(error.code, error.read(), "text/plain")
        else:
            self.answer(404, b"not found", "text/plain")

    def answer(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def notebook_server(cell: str, forward: dict[int, int], live: bool = True) -> Iterator[NotebookServer]:
    head = JUPYTER_CONFIG if live else ""  # a static viewer's page carries no notebook configuration
    page = f"<!doctype html><html><head>{head}</head><body>{cell}</body></html>"
    server = NotebookServer(page, forward)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def rendered(url: str) -> str:
    """The document at `url` once Chromium has run its scripts (and waited for what they fetched)."""
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=8000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def cell(server: BoardServer, picture: bytes | None = b"\x89PNG") -> str:
    return cell_output(server, Frontend("jupyter", None), 700, picture, shown="runs/tiny", points=2)["text/html"]


def frame_source(document: str) -> str | None:
    match = re.search(r'<iframe[^>]*src="([^"]+)"', document)
    return match.group(1).replace("&amp;", "&") if match else None


def note(document: str) -> str:
    """The cell's note (HTML) as the script left it."""
    return re.search(r'<p class="trainer-board-note">(.*?)</p>', document, re.S).group(1)


def picture_shown(document: str) -> bool:
    return re.search(r'<img class="trainer-board-picture"[^>]*>', document).group(0).count("display: none") == 0


def as_kernel_sees(served: board.Board, port: int) -> BoardServer:
    """The server as the kernel reports it, on `port`."""
    return BoardServer(str(served.path.resolve()), 1, port, "127.0.0.1", server_url("127.0.0.1", port))


def test_a_page_on_this_machine_opens_the_server_directly(served):
    """A page on ``localhost`` whose browser reaches the server's port: the cross-origin check of
    ``trainer-board.json`` reads it, and the frame opens the server directly, with TensorBoard's
    time series unsmoothed and a link to open it in a new tab."""
    with notebook_server(cell(as_kernel_sees(served, served.port)), {}) as notebook:
        document = rendered(f"http://localhost:{notebook.server_port}/lab")
    assert frame_source(document) == f"http://127.0.0.1:{served.port}/?smoothing=0#timeseries"
    assert "open in a new tab" in note(document) and not picture_shown(document)
    assert not any(path.startswith("/proxy/") for path in notebook.paths)


def test_through_an_ssh_tunnel_the_page_reaches_the_server_through_the_notebook_servers_proxy(served):
    """``ssh -L 8888:localhost:8888``: the page is on ``localhost``, but the kernel's port (here a
    port where nothing listens on the browser's side) is not forwarded; the notebook server forwards
    ``/proxy/PORT/`` to it. The direct address does not answer, so the frame opens the same-origin
    proxy address."""
    remote = free_port()  # the server's port on the remote machine: nothing answers on it here
    with notebook_server(cell(as_kernel_sees(served, remote)), {remote: served.port}) as notebook:
        document = rendered(f"http://localhost:{notebook.server_port}/lab")
    assert frame_source(document) == f"http://localhost:{notebook.server_port}/proxy/{remote}/?smoothing=0#timeseries"
    assert f"/proxy/{remote}/trainer-board.json" in notebook.paths


def test_without_a_proxy_the_note_names_both_addresses_and_proxy_url(served):
    """The same tunnel where the notebook server has no jupyter-server-proxy (``/proxy/`` is a 404):
    no frame; the picture stays and the note names the addresses tried and ``proxy_url=``."""
    remote = free_port()
    with notebook_server(cell(as_kernel_sees(served, remote)), {}) as notebook:
        document = rendered(f"http://localhost:{notebook.server_port}/lab")
    assert frame_source(document) is None and "does not answer at" in note(document)
    assert f"http://127.0.0.1:{remote}/" in note(document) and f"/proxy/{remote}/" in note(document)
    assert "proxy_url=" in note(document) and picture_shown(document)


def test_another_page_on_the_address_is_not_taken_for_the_board(served, tmp_path):
    """A page that answers on the server's address but is not this folder's server (a proxy's page,
    another service, a board of another folder) is never shown as the board."""
    other = BoardServer(str(tmp_path), 1, served.port, "127.0.0.1", served.url)  # served.port serves another folder
    with notebook_server(cell(other), {}) as notebook:
        document = rendered(f"http://localhost:{notebook.server_port}/lab")
    assert frame_source(document) is None and "does not answer at" in note(document)


def test_a_static_viewer_shows_the_picture_and_the_neutral_note_and_asks_nothing(served):
    """A page without a notebook's configuration (nbviewer, an nbconvert export) that runs scripts:
    the picture and the note stay as written, and the page asks no address."""
    remote = free_port()
    with notebook_server(cell(as_kernel_sees(served, remote)), {remote: served.port}, live=False) as notebook:
        document = rendered(f"http://localhost:{notebook.server_port}/lab")
    assert frame_source(document) is None and picture_shown(document)
    assert note(document).startswith("A picture of the run when this cell ran")
    assert not any("proxy" in path or "trainer-board" in path for path in notebook.paths)
