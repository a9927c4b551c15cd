"""Make the README's TensorBoard screenshots for both recipes with headless Chromium.

For each recipe this trains a fresh short run in a temporary directory, serves it with
``python -m trainer.board``, and captures five TensorBoard tabs with headless Chromium:

* ``nested_unet``: ``python -m recipes.nested_unet`` on 64 training and 16 validation images of the
  built-in synthetic nuclei, 3 epochs (NestedUNet, batch size 4);
* ``fashion_mnist``: ``python -m recipes.fashion_mnist`` for 2 epochs on small Fashion-MNIST-like
  IDX files (960 training, 160 test images) written with ``trainer_datasets``.

The tabs are Time Series (``#timeseries``), Custom Scalars (``#custom_scalars``), Images
(``#images``), Graphs (``#graphs``) and HParams (``#hparams``), the plugin names TensorBoard 2.x
uses in its URL fragment. The PNGs go to ``docs/images/<recipe>-<tab>.png``, e.g.
``docs/images/nested_unet-timeseries.png``, and their paths are printed at the end.

How the pages are made to finish and to show what each tab is for:

* charts are drawn as SVG (TensorBoard's ``?forceSVG=true``), so they are complete within
  Chromium's virtual time budget instead of being drawn later by a WebGL worker;
* a loopback proxy in front of TensorBoard adds one same-origin script to its page that sets
  TensorBoard's own saved settings before it starts: the Time Series settings pane closed, cards
  two to a row, and the per-step ``training loss`` chart pinned above the epoch loss charts;
* the Images tab opens with the tag filter ``.*``, which shows every image tag in one open group
  (TensorBoard's default leaves the third group, the predictions, collapsed);
* on the Graphs tab the same script hides the navigation minimap and expands a small model's
  node one level (the tutorial's CNN shows its layers; NestedUNet, too wide to read expanded,
  stays one box);
* a run is captured only once the server lists it and its scalar tags have stopped changing.

Needs: the project's virtual environment (PyTorch, TensorBoard, Pillow) and the Debian
``chromium`` package (``/usr/bin/chromium``); nothing is installed, and without Chromium the
script prints one line saying so and exits with status 2. No network access is needed.

Run it from the repository root (``docs`` imports as a namespace package)::

    .venv/bin/python -m docs.screenshots                     # both recipes: about 1.5 min on 2 idle CPU cores
    .venv/bin/python -m docs.screenshots --recipes fashion_mnist
    .venv/bin/python -m docs.screenshots --work-dir /tmp/shots   # keep the runs; rerun reuses them

``python docs/screenshots.py`` works as well. Most of the time goes to training NestedUNet
(48 steps, half a minute on an idle machine); the ten captures take about half a minute.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "images"
CHROMIUM_PATHS = ("/usr/bin/chromium", "chromium")
RECIPES = ("nested_unet", "fashion_mnist")

#: TensorBoard tab (its URL fragment) -> (extra fragment arguments, window width, window height).
TABS: dict[str, tuple[str, int, int]] = {
    "timeseries": ("", 1400, 1100),
    "custom_scalars": ("", 1400, 700),
    "images": ("&tagFilter=.*", 1400, 1000),
    "graphs": ("", 1400, 700),
    "hparams": ("", 2200, 440),
}

#: The largest PNG written as full colour; larger ones are reduced to a 256-colour palette.
MAX_PNG_BYTES = 250_000

#: Path of the script the proxy adds to TensorBoard's page.
SETTINGS_SCRIPT_PATH = "/docs-screenshots-settings.js"

#: TensorBoard's saved global settings (localStorage ``_tb_global_settings``) for the captures:
#: the Time Series settings pane closed, cards at least 500 px wide (two to a row), and y axes
#: that fit every point (a short run's first losses would count as outliers).
TENSORBOARD_SETTINGS = {"timeSeriesSettingsPaneOpened": False, "timeSeriesCardMinWidth": 500, "ignoreOutliers": False}

#: Scalar tags pinned at the top of Time Series (localStorage ``tb-saved-scalar-pins``).
PINNED_TAGS = ["training loss"]

#: The most direct children a model's graph node may have to be shown expanded: the tutorial's
#: CNN (11: its layers and ops) fits the window; NestedUNet (20 blocks and op groups, with their
#: skip connections laid out in one long row) would be drawn too small to read, so it stays one box.
GRAPH_EXPAND_MAX_CHILDREN = 12

#: On the Graphs tab: once the graph is drawn, hide the navigation minimap (headless Chromium
#: may capture it half drawn) and expand the model's node (the root's largest group) one level
#: if it has at most MAX_CHILDREN children, so a small network shows its layers.
EXPAND_MODEL_SCRIPT = """
(function () {
  if (!location.hash.startsWith("#graphs")) return;
  function find(root, selector) {
    var hit = root.querySelector(selector);
    if (hit) return hit;
    var all = root.querySelectorAll("*");
    for (var i = 0; i < all.length; i++) {
      if (all[i].shadowRoot && (hit = find(all[i].shadowRoot, selector))) return hit;
    }
    return null;
  }
  var tries = 0;
  var timer = setInterval(function () {
    var graph = find(document, "tf-graph");
    var hierarchy = graph && graph.renderHierarchy;
    if (++tries > 40) clearInterval(timer);
    if (!hierarchy) return;
    clearInterval(timer);
    var minimap = find(graph.shadowRoot || graph, "tf-graph-minimap");
    if (minimap) minimap.style.visibility = "hidden";
    var best = null;
    hierarchy.root.node.metagraph.nodes().forEach(function (name) {
      var node = hierarchy.getRenderNodeByName(name);
      if (node && node.node.type === 0 && (!best || node.node.cardinality > best.node.cardinality)) best = node;
    });
    if (!best || best.node.metagraph.nodeCount() > MAX_CHILDREN) return;
    hierarchy.buildSubhierarchy(best.node.name);
    best.expanded = true;
    graph.$.scene.setNodeExpanded(best);
    setTimeout(function () { graph.fit(); }, 1000);
    setTimeout(function () { graph.fit(); }, 3000);
  }, 250);
})();
"""


def page_script(settings: dict[str, Any], pins: list[str]) -> bytes:
    """JavaScript run before TensorBoard starts: saves `settings` and the pinned scalar `pins` in
    its localStorage, and on the Graphs tab expands a small model's node (`EXPAND_MODEL_SCRIPT`)."""
    lines = [f"window.localStorage.setItem({json.dumps(key)}, {json.dumps(json.dumps(value))});"
             for key, value in (("_tb_global_settings", settings), ("tb-saved-scalar-pins", pins))]
    expand = EXPAND_MODEL_SCRIPT.replace("MAX_CHILDREN", str(GRAPH_EXPAND_MAX_CHILDREN))
    return ("\n".join(lines) + expand).encode()


#: The line ``python -m trainer.board`` prints once it serves: ``TensorBoard on PATH: URL``.
URL_LINE = re.compile(r"^TensorBoard on .*: (http://\S+)\s*$")


class ScreenshotError(RuntimeError):
    """A step (training, serving or capturing) failed; the message says which and why."""


def find_chromium() -> str | None:
    """The Chromium executable: ``/usr/bin/chromium`` or ``chromium`` on PATH; None if neither."""
    for name in CHROMIUM_PATHS:
        found = shutil.which(name)
        if found:
            return found
    return None


def child_env() -> dict[str, str]:
    """The environment for the recipe and board subprocesses: PYTHONPATH holds the repo and datasets/."""
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "datasets")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_recipe(args: list[str], log: Path) -> None:
    """Run ``python ARGS`` from the repo root with its output in `log`; raise `ScreenshotError` if it fails."""
    print("$ python " + " ".join(args), flush=True)
    start = time.monotonic()
    with open(log, "w") as out:
        code = subprocess.call([sys.executable, *args], cwd=ROOT, env=child_env(), stdout=out,
                               stderr=subprocess.STDOUT)
    if code != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise ScreenshotError(f"`python {' '.join(args)}` exited with {code}:\n" + "\n".join(tail))
    print(f"  done in {time.monotonic() - start:.0f} s", flush=True)


def train_nested_unet(work: Path) -> Path:
    """A short NestedUNet run on the built-in synthetic nuclei in ``work/nested_unet``; returns its directory.

    An existing run there (one with ``metrics.csv``) is reused.
    """
    run_dir = work / "nested_unet"
    if not reuse(run_dir):
        run_recipe(["-m", "recipes.nested_unet", "--train-samples", "64", "--val-samples", "16", "--epochs", "3",
                    "--batch-size", "4", "--log-dir", str(run_dir)], work / "nested_unet.log")
    return run_dir


def reuse(run_dir: Path) -> bool:
    """Whether `run_dir` holds a finished run (one with ``metrics.csv``) to reuse; if not, it is
    cleared for a new one."""
    if (run_dir / "metrics.csv").is_file():
        print(f"reusing {run_dir}")
        return True
    shutil.rmtree(run_dir, ignore_errors=True)
    return False


def write_fashion_idx(data_dir: Path) -> None:
    """Small learnable Fashion-MNIST-like IDX files (960 training, 160 test images) under `data_dir`."""
    for folder in (ROOT, ROOT / "datasets"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    from trainer_datasets import make_learnable_fashion_like, write_fashion_mnist_idx

    train_images, train_labels = make_learnable_fashion_like(960, seed=0)
    test_images, test_labels = make_learnable_fashion_like(160, seed=1)
    write_fashion_mnist_idx(data_dir, train_images, train_labels, train=True)
    write_fashion_mnist_idx(data_dir, test_images, test_labels, train=False)


def train_fashion_mnist(work: Path) -> Path:
    """A short tutorial-recipe run on small IDX files in ``work/fashion_mnist``; returns its directory.

    Batch size 8 and learning rate 0.02 (instead of the tutorial's 4 and 0.001) make the two
    epochs reach a high accuracy, so the charts and prediction figures show learning. An
    existing run there (one with ``metrics.csv``) is reused.
    """
    run_dir = work / "fashion_mnist"
    if reuse(run_dir):
        return run_dir
    data_dir = work / "idx"
    write_fashion_idx(data_dir)
    run_recipe(["-m", "recipes.fashion_mnist", "--data-dir", str(data_dir), "--log-dir", str(run_dir),
                "--epochs", "2", "--log-every", "20", "--batch-size", "8", "--lr", "0.02"],
               work / "fashion_mnist.log")
    return run_dir


TRAINERS = {"nested_unet": train_nested_unet, "fashion_mnist": train_fashion_mnist}


class Board:
    """``python -m trainer.board RUN_DIR`` as a subprocess; `url` once it serves, `stop()` ends it."""

    def __init__(self, run_dir: Path, timeout: float = 120.0) -> None:
        self.run_dir = run_dir
        self.process = subprocess.Popen(
            [sys.executable, "-m", "trainer.board", str(run_dir)], cwd=ROOT, env=child_env(),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.output: list[str] = []
        found = threading.Event()
        self.url = ""

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.output.append(line)
                match = URL_LINE.match(line)
                if match and not self.url:
                    self.url = match.group(1).rstrip("/") + "/"
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(timeout) or not self.url:
            self.stop()
            raise ScreenshotError(f"`python -m trainer.board {run_dir}` printed no URL:\n" + "".join(self.output))

    def stop(self) -> None:
        """End the server as Ctrl-C does (so it removes its temporary link folder), then SIGTERM, SIGKILL."""
        for end in (lambda: self.process.send_signal(signal.SIGINT), self.process.terminate, self.process.kill):
            if self.process.poll() is not None:
                return
            end()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                pass


def get_json(url: str, timeout: float = 10.0) -> Any:
    """The JSON that `url` answers with."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def wait_until_loaded(url: str, run: str, timeout: float = 120.0) -> None:
    """Wait until TensorBoard at `url` lists `run` in ``/data/runs`` and its scalar tags stop changing."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            runs = get_json(url + "data/runs")
            tags = get_json(url + "data/plugin/scalars/tags") if run in runs else None
        except (OSError, ValueError):
            tags = None
        if tags and tags.get(run) and tags == last:
            return
        last = tags
        time.sleep(1.0)
    raise ScreenshotError(f"TensorBoard at {url} did not list the run {run!r} within {timeout:.0f} s")


def start_proxy(upstream: str, script: bytes) -> http.server.ThreadingHTTPServer:
    """A loopback HTTP proxy to TensorBoard at `upstream` whose page runs the JavaScript `script` first.

    It serves on ``127.0.0.1`` at a free port (``server.server_port``) in a daemon thread; call
    ``shutdown()`` and ``server_close()`` to stop it.
    """
    skipped = {"host", "accept-encoding", "connection", "content-length"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.forward(None)

        def do_POST(self) -> None:
            self.forward(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

        def forward(self, body: bytes | None) -> None:
            if self.path == SETTINGS_SCRIPT_PATH:
                self.reply(200, [("Content-Type", "text/javascript")], script)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in skipped}
            request = urllib.request.Request(upstream.rstrip("/") + self.path, data=body, headers=headers,
                                             method=self.command)
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    status, head, data = response.status, response.getheaders(), response.read()
            except urllib.error.HTTPError as exc:
                status, head, data = exc.code, exc.headers.items(), exc.read()
            except OSError as exc:
                self.reply(502, [("Content-Type", "text/plain")], str(exc).encode())
                return
            content_type = dict((k.lower(), v) for k, v in head).get("content-type", "")
            if content_type.startswith("text/html") and data.lower().startswith(b"<!doctype html>"):
                tag = f'<script src="{SETTINGS_SCRIPT_PATH}"></script>'.encode()
                data = data[:15] + tag + data[15:]
            self.reply(status, [(k, v) for k, v in head if k.lower() not in skipped | {"transfer-encoding"}], data)

        def reply(self, status: int, head: list[tuple[str, str]], data: bytes) -> None:
            self.send_response(status)
            for key, value in head:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def capture(chromium: str, url: str, out: Path, width: int, height: int, budget_ms: int, profile: Path) -> None:
    """Screenshot `url` with headless Chromium into `out` (PNG), in a `width` x `height` window.

    `budget_ms` is Chromium's virtual time budget: how long the page may load and run scripts
    before the capture. `profile` is a fresh Chromium profile folder. Tries twice.
    """
    command = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url]
    error = ""
    for _ in range(2):
        out.unlink(missing_ok=True)
        shutil.rmtree(profile, ignore_errors=True)
        try:
            result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180)
        except subprocess.TimeoutExpired:
            error = "timed out after 180 s"
            continue
        if out.is_file() and out.stat().st_size > 0:
            return
        error = result.stdout.strip()[-2000:]
    raise ScreenshotError(f"chromium made no screenshot of {url}: {error}")


def trim_bottom(image: Any, margin: int = 24, min_height: int = 360) -> Any:
    """`image` without the rows at its bottom that repeat its last row, keeping `margin` of them."""
    rgb = image.convert("RGB")
    width, height = rgb.size
    last = rgb.crop((0, height - 1, width, height)).tobytes()
    bottom = height
    while bottom > min_height and rgb.crop((0, bottom - 1, width, bottom)).tobytes() == last:
        bottom -= 1
    return rgb.crop((0, 0, width, min(height, bottom + margin)))


def save_png(image: Any, path: Path) -> None:
    """Save `image` as an optimised PNG; as a 256-colour palette one if larger than `MAX_PNG_BYTES`."""
    image.save(path, optimize=True)
    if path.stat().st_size > MAX_PNG_BYTES:
        image.quantize(colors=256, dither=0).save(path, optimize=True)


def shoot_run(recipe: str, run_dir: Path, chromium: str, out_dir: Path, budget_ms: int, work: Path) -> list[Path]:
    """Serve `run_dir` and capture every tab in `TABS` to ``out_dir/<recipe>-<tab>.png``; returns the paths."""
    from PIL import Image

    board = Board(run_dir)
    proxy = None
    written: list[Path] = []
    try:
        wait_until_loaded(board.url, run_dir.name)
        proxy = start_proxy(board.url, page_script(TENSORBOARD_SETTINGS, PINNED_TAGS))
        base = f"http://127.0.0.1:{proxy.server_port}/?forceSVG=true"
        print(f"TensorBoard for {recipe}: {board.url} (captured through {base})", flush=True)
        for tab, (extra, width, height) in TABS.items():
            raw = work / f"{recipe}-{tab}.raw.png"
            capture(chromium, f"{base}#{tab}{extra}", raw, width, height, budget_ms, work / "chromium-profile")
            path = out_dir / f"{recipe}-{tab}.png"
            with Image.open(raw) as image:
                save_png(trim_bottom(image), path)
            written.append(path)
    finally:
        if proxy is not None:
            proxy.shutdown()
            proxy.server_close()
        board.stop()
    return written


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(prog="python -m docs.screenshots",
                                     description="Make the README's TensorBoard screenshots with headless Chromium.")
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES),
                        help="recipes to train and capture (default: both)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the PNGs (default: docs/images)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="train into this folder and keep it; runs already there are reused "
                             "(default: a temporary folder, removed at the end)")
    parser.add_argument("--budget-ms", type=int, default=15000,
                        help="Chromium's virtual time budget per page in ms (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Train, serve and capture; print the PNGs written. Returns the exit code (2: no Chromium)."""
    args = build_parser().parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("error: headless screenshots need Chromium at /usr/bin/chromium: install the Debian `chromium` package",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    temporary = None
    if args.work_dir is None:
        temporary = tempfile.mkdtemp(prefix="docs-screenshots-")
        work = Path(temporary)
    else:
        work = args.work_dir.resolve()
        work.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for recipe in args.recipes:
            run_dir = TRAINERS[recipe](work)
            written += shoot_run(recipe, run_dir, chromium, args.out, args.budget_ms, work)
    except ScreenshotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    for path in written:
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        print(f"{shown}  ({path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
