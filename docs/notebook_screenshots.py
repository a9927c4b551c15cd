"""Check `trainer.board.show` in a real JupyterLab with headless Chromium, and make the screenshots
of docs/notebooks.md and docs/tensorboard.md.

A notebook trains the library example of docs/tensorboard.md with the TensorBoard callbacks and calls
``trainer.board.show(run)``; it is executed in a Jupyter kernel (nbclient) and saved, then opened in
JupyterLab by headless Chromium in four situations:

* ``local``: the browser on the notebook's machine (JupyterLab at ``127.0.0.1``);
* ``remote``: the browser can reach nothing but Jupyter's own port. Chromium sends every request
  through a gate proxy that lets through only JupyterLab's address, which is not a loopback
  address, so the page uses jupyter-server-proxy (``<base_url>proxy/PORT/``);
* ``tunnel``: as through ``ssh -L``: the page is on ``localhost``, but the gate lets through only
  JupyterLab's port, so the direct address of the TensorBoard server does not answer and the page
  falls back to jupyter-server-proxy;
* ``restarted``: the server is gone (stopped, as after a reboot): the cell says what to run;
* ``saved``: the saved notebook opened untrusted (as on another machine, GitHub or nbviewer):
  no script runs; the picture of the run and the line saying what to run are what shows.

Each capture is checked: the script prints what the cell shows (``live TensorBoard``, ``message``
or ``picture``) and fails unless it is what that situation should show. The PNGs go to
``docs/images/notebook-<situation>.png``.

Needs, none of which the project requires: the Debian ``chromium`` package, and ``jupyterlab``,
``jupyter-server-proxy``, ``nbclient`` and ``ipykernel`` importable by the Python that runs it
(with the project's own dependencies), e.g. a virtual environment made for it. It installs
nothing and needs no network. From the repository root::

    python -m docs.notebook_screenshots                 # about a minute
    python -m docs.notebook_screenshots --keep /tmp/lab   # keep the notebook and runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from docs.screenshots import CHROMIUM_PATHS, find_chromium, headless_chromium

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "images"
SITUATIONS = ("local", "remote", "tunnel", "restarted", "saved")
#: What the cell must show in each situation (see `cell_state`).
EXPECTED = {
    "local": "live TensorBoard",
    "remote": "live TensorBoard",
    "tunnel": "live TensorBoard",
    "restarted": "message",
    "saved": "picture",
}

TRAIN = """import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trainer.board
from trainer import Trainer
from trainer.callbacks import TensorBoardCallback

torch.manual_seed(0)
x = torch.randn(256, 8)
y = x[:, :4].argmax(1)
train_loader = DataLoader(TensorDataset(x[:192], y[:192]), batch_size=32, shuffle=True)
val_loader = DataLoader(TensorDataset(x[192:], y[192:]), batch_size=64)
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
fit = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), nn.CrossEntropyLoss(),
              callbacks=[TensorBoardCallback("runs/readme_example", every_n_steps=2)], max_epochs=5, device="cpu")
history = fit.fit(train_loader, val_loader)"""
SHOW = 'trainer.board.show("runs/readme_example")'


class NotebookCheckError(RuntimeError):
    """A step failed; the message says which and why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def outward_address() -> str:
    """An address of this machine that is not loopback (the remote page's host)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = sock.getsockname()[0]
        except OSError:
            address = ""
    if not address or address.startswith("127."):
        raise NotebookCheckError("this machine has no address other than loopback for the remote situation")
    return address


def child_env(**extra: str) -> dict[str, str]:
    paths = [str(ROOT), str(ROOT / "datasets"), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), **extra)


def execute_notebook(work: Path) -> Path:
    """Write the notebook in `work`, run it in a Jupyter kernel, save it; returns its path."""
    import nbclient
    import nbformat

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(TRAIN), nbformat.v4.new_code_cell(SHOW)])
    notebook.cells[0].metadata["jupyter"] = {"source_hidden": True}  # the screenshots show the show() cell
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    previous = dict(os.environ)
    os.environ.update(child_env())
    try:
        nbclient.NotebookClient(
            notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(work)}}
        ).execute()
    finally:
        os.environ.clear()
        os.environ.update(previous)
    path = work / "board.ipynb"
    nbformat.write(notebook, path)
    return path


class Gate:
    """An HTTP proxy for Chromium that lets through only requests to `allowed` (``host:port``),
    plain or tunnelled (CONNECT, which Chromium uses for WebSockets), and refuses every other."""

    def __init__(self, allowed: str) -> None:
        self.allowed = allowed
        self.refused: list[str] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        with contextlib.closing(client):
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    return
                head += chunk
            request_line, _, rest = head.partition(b"\r\n")
            method, target, version = request_line.decode("latin-1").split(" ", 2)
            if method == "CONNECT":
                where = target
            else:
                parts = urlsplit(target)
                where = parts.netloc
                path = parts.path + (f"?{parts.query}" if parts.query else "")
                # One request per connection: what follows on a kept-alive one would reach the
                # server in proxy form (absolute URLs), which it does not route.
                lines = [
                    line
                    for line in rest.split(b"\r\n")
                    if not line.lower().startswith((b"proxy-connection", b"connection"))
                ]
                head = f"{method} {path or '/'} {version}\r\nConnection: close\r\n".encode("latin-1") + b"\r\n".join(
                    lines
                )
            if where != self.allowed:
                self.refused.append(where)
                client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            host, port = where.rsplit(":", 1)
            with contextlib.closing(socket.create_connection((host, int(port)))) as upstream:
                if method == "CONNECT":
                    client.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                else:
                    upstream.sendall(head)
                pipe(client, upstream)

    def close(self) -> None:
        self.sock.close()


def pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    while True:
        ready, _, _ = select.select([a, b], [], [], 60)
        if not ready:
            return
        for source in ready:
            data = source.recv(65536)
            if not data:
                return
            (b if source is a else a).sendall(data)


def start_lab(work: Path, host: str, port: int, log: Path) -> subprocess.Popen:
    """JupyterLab serving `work` on `host`:`port`, without token (a throwaway local server)."""
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        f"--ServerApp.ip={host}",
        f"--ServerApp.port={port}",
        "--ServerApp.token=",
        "--ServerApp.password=",
        "--ServerApp.disable_check_xsrf=True",
        f"--ServerApp.root_dir={work}",
        "--ServerApp.allow_remote_access=True",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")  # a container's root
    settings = work / ".lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')  # no news prompt
    command.append(f"--LabApp.user_settings_dir={work / '.lab-settings'}")
    process = subprocess.Popen(
        command,
        cwd=work,
        env=child_env(JUPYTER_CONFIG_DIR=str(work / ".jupyter-config"), JUPYTER_DATA_DIR=str(work / ".jupyter-data")),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"http://{host}:{port}/api/status", timeout=2).read()
            return process
        if process.poll() is not None:
            break
        time.sleep(0.5)
    process.kill()
    raise NotebookCheckError(f"JupyterLab did not start; its log: {log}")


def trust(notebook: Path, work: Path) -> None:
    """Sign `notebook` with the lab's own secret, as opening and saving it in JupyterLab does."""
    import nbformat
    from nbformat.sign import NotebookNotary

    content = nbformat.read(notebook, as_version=4)
    NotebookNotary(data_dir=str(work / ".jupyter-data")).sign(content)
    nbformat.write(content, notebook)


def chromium(url: str, out: Path, profile: Path, proxy: int | None, expect: str, timeout: float = 180.0) -> str:
    """Open `url` in headless Chromium, driven through its DevTools protocol (JupyterLab keeps
    connections open, so ``--virtual-time-budget`` would never end): wait until the show() cell
    shows `expect` (`cell_state`; at most `timeout` s), give a live frame time to draw, screenshot
    the page to `out` and return its DOM."""
    import base64

    import websocket  # websocket-client, a dependency of jupyter_server

    debug = free_port()
    command = headless_chromium(
        find_chromium() or CHROMIUM_PATHS[0],
        profile,
        1400,
        1250,
        f"--remote-debugging-port={debug}",
        "--remote-allow-origins=*",
        "about:blank",
    )
    if proxy is not None:  # everything, loopback included, through the gate
        command[1:1] = [f"--proxy-server=http://127.0.0.1:{proxy}", "--proxy-bypass-list=<-loopback>"]
    shutil.rmtree(profile, ignore_errors=True)
    browser = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    calls = iter(range(1, 1 << 30))

    def call(method: str, **params: object) -> dict:
        number = next(calls)
        page.send(json.dumps({"id": number, "method": method, "params": params}))
        while True:
            answer = json.loads(page.recv())
            if answer.get("id") == number:
                return answer.get("result", {})

    try:
        deadline = time.monotonic() + timeout
        targets: list = []
        while not targets and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                targets = [
                    t
                    for t in json.load(urllib.request.urlopen(f"http://127.0.0.1:{debug}/json/list", timeout=5))
                    if t.get("type") == "page"
                ]
            time.sleep(0.5)
        if not targets:
            raise NotebookCheckError("chromium did not start")
        page = websocket.create_connection(targets[0]["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        call("Page.navigate", url=url)
        dom, state = "", "nothing"
        while time.monotonic() < deadline:
            time.sleep(2)
            dom = call("Runtime.evaluate", expression="document.documentElement.outerHTML")["result"]["value"]
            state = cell_state(dom)
            if state == expect:
                break
        time.sleep(15 if state == "live TensorBoard" else 3)  # TensorBoard draws its charts in the frame
        dom = call("Runtime.evaluate", expression="document.documentElement.outerHTML")["result"]["value"]
        out.write_bytes(base64.b64decode(call("Page.captureScreenshot", format="png")["data"]))
        page.close()
        return dom
    finally:
        browser.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            browser.wait(20)
        shutil.rmtree(profile, ignore_errors=True)


def cell_state(dom: str) -> str:
    """What the show() cell holds in the dumped DOM: the live frame, the message, or the picture."""
    if "<iframe" in dom and "open in a new tab</a>" in dom:
        return "live TensorBoard"
    if "does not answer at <code>" in dom:
        return "message"
    if "To open TensorBoard live" in dom:
        return "picture"
    return "nothing"


def main(argv: list[str] | None = None) -> int:
    """Run the four situations; print what each cell showed. Returns 0 if each was as expected."""
    parser = argparse.ArgumentParser(prog="python -m docs.notebook_screenshots", description=__doc__.split("\n")[0])
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    parser.add_argument("--out", type=Path, default=OUT, help="folder of the PNGs (default: docs/images)")
    args = parser.parse_args(argv)
    if find_chromium() is None:
        print("error: needs Chromium at /usr/bin/chromium (the Debian chromium package)", file=sys.stderr)
        return 2
    for module in ("jupyterlab", "jupyter_server_proxy", "nbclient", "ipykernel"):
        try:
            __import__(module)
        except ImportError:
            print(
                f"error: needs {module} (pip install jupyterlab jupyter-server-proxy nbclient ipykernel, in a "
                "virtual environment of its own)",
                file=sys.stderr,
            )
            return 2
    work = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="notebook-screenshots-"))
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    import nbformat

    import trainer.board

    labs: list[subprocess.Popen] = []
    results: dict[str, str] = {}
    try:
        notebook = execute_notebook(work)
        saved = work / "saved.ipynb"
        copy = nbformat.read(notebook, as_version=4)
        copy.metadata["title"] = "saved elsewhere"  # other content, so signing the original does not sign it
        nbformat.write(copy, saved)  # never signed: opens untrusted
        host = outward_address()
        port = free_port()
        labs.append(start_lab(work, "0.0.0.0", port, work / "lab.log"))
        trust(notebook, work)
        pages = {
            "local": (f"http://127.0.0.1:{port}/lab/tree/board.ipynb?reset", None),
            "remote": (f"http://{host}:{port}/lab/tree/board.ipynb?reset", f"{host}:{port}"),
            "tunnel": (f"http://localhost:{port}/lab/tree/board.ipynb?reset", f"localhost:{port}"),
            "restarted": (f"http://127.0.0.1:{port}/lab/tree/board.ipynb?reset", None),
            "saved": (f"http://127.0.0.1:{port}/lab/tree/saved.ipynb?reset", None),
        }
        for situation in SITUATIONS:
            url, allowed = pages[situation]
            if situation == "restarted":
                trainer.board.stop_all()
            gate = Gate(allowed) if allowed else None
            try:
                out = args.out / f"notebook-{situation}.png"
                dom = chromium(url, out, work / "chromium-profile", gate.port if gate else None, EXPECTED[situation])
            finally:
                if gate:
                    gate.close()
            results[situation] = cell_state(dom)
            refused = f"; refused by the gate: {sorted(set(gate.refused))}" if gate and gate.refused else ""
            print(f"{situation:<10} {results[situation]:<17} {out}{refused}", flush=True)
    except NotebookCheckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        trainer.board.stop_all()
        for lab in labs:
            lab.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                lab.wait(20)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    wrong = {s: got for s, got in results.items() if got != EXPECTED[s]}
    if wrong:
        print(
            "error: " + "; ".join(f"{s} showed {got}, expected {EXPECTED[s]}" for s, got in wrong.items()),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
