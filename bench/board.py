"""What `trainer.board` costs, side by side with TensorBoard's own server (what ``%tensorboard`` runs).

Measured in one run, on this machine:

- a server of a tiny run: its start (from the command to its first answer of ``data/environment``)
  and its resident memory (``ps -o rss``), for ``python -m trainer.board RUN`` and for
  ``python -m tensorboard.main --logdir RUN`` (with its data server, where it starts one);
- `trainer.board.stop_all` of 4 servers started by 4 other live processes (kernels);
- a notebook cell ``trainer.board.show(RUN)`` on a large run (``--megabytes`` of event files, mostly
  images), run in a real Jupyter kernel: its first run and a re-run that reuses the server.

Times depend on the load of the machine: compare the numbers of one run only. From the repository
root::

    python -m bench.board                  # about a minute
    python -m bench.board --megabytes 100
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def env(**extra: str) -> dict[str, str]:
    paths = [str(ROOT), str(ROOT / "datasets"), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), **extra)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_run(folder: Path, megabytes: float = 0.0) -> Path:
    """A run of 200 loss points and, for `megabytes`, 100-kB images (random pixels: they do not compress)."""
    import numpy as np
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard.writer import FileWriter

    writer = FileWriter(str(folder))
    for step in range(1, 201):
        writer.add_summary(Summary(value=[Summary.Value(tag="Loss/training loss", simple_value=1.0 / step)]), step)
    rng = np.random.default_rng(0)
    for step in range(int(megabytes * 10)):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (180, 180, 3), dtype=np.uint8)).save(buffer, format="PNG")
        image = Summary.Image(encoded_image_string=buffer.getvalue(), height=180, width=180, colorspace=3)
        writer.add_summary(Summary(value=[Summary.Value(tag="predictions vs. actuals", image=image)]), step)
    writer.close()
    return folder


def rss_mb(pid: int) -> float:
    """The resident memory of `pid` and its children, in MB (``ps -o rss``)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    total = 0
    for each in [str(pid), *children]:
        answer = subprocess.run(["ps", "-o", "rss=", "-p", each], capture_output=True, text=True).stdout.strip()
        total += int(answer or 0)
    return total / 1024


def serve(command: list[str], url: str) -> tuple[float, float]:
    """Start `command`, wait for `url`data/environment to answer; (seconds, MB resident), then stop it."""
    began = time.monotonic()
    process = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}data/environment", timeout=1).read()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() - began > 120:
                    raise RuntimeError(f"{command} did not serve") from None
                time.sleep(0.02)
        started = time.monotonic() - began
        time.sleep(2)  # its first load of the run
        return started, rss_mb(process.pid)
    finally:
        process.terminate()
        process.wait()


def servers(run: Path) -> None:
    for name, command in (
        ("python -m trainer.board", [sys.executable, "-m", "trainer.board", str(run), "--port", "{port}"]),
        (
            "python -m tensorboard.main",
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(run), "--port", "{port}"],
        ),
    ):
        port = free_port()
        seconds, megabytes = serve([part.replace("{port}", str(port)) for part in command], f"http://127.0.0.1:{port}/")
        print(f"{name:28s} start {seconds:5.2f} s   RSS {megabytes:6.0f} MB")


KERNEL = "import sys, trainer.board\ntrainer.board.show(sys.argv[1])\nprint(flush=True)\nsys.stdin.read()\n"


def stop_all(root: Path) -> None:
    import trainer.board

    kernels = [
        subprocess.Popen(
            [sys.executable, "-c", KERNEL, str(write_run(root / f"run{index}"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env(),
        )
        for index in range(4)
    ]
    for kernel in kernels:
        assert kernel.stdout is not None
        kernel.stdout.readline(), kernel.stdout.readline()
    began = time.monotonic()
    count = trainer.board.stop_all()
    print(f"stop_all() of {count} servers of 4 other live processes: {time.monotonic() - began:.2f} s")
    for kernel in kernels:
        kernel.communicate("")


CELL = """import time, trainer.board
began = time.perf_counter()
trainer.board.show({path!r})
print(f"{{time.perf_counter() - began:.2f}}")"""


def rerun(run: Path) -> None:
    import nbclient
    import nbformat

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(CELL.format(path=str(run))) for _ in "ab"])
    os.environ.update(env())
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3").execute()
    first, again = ("".join(o.get("text", "") for o in cell.outputs).strip() for cell in notebook.cells)
    sizes = [sum(len(v) for o in cell.outputs for v in o.get("data", {}).values()) / 1e3 for cell in notebook.cells]
    size = sum(p.stat().st_size for p in run.iterdir()) / 1e6
    print(f"show() in a kernel on a {size:.0f} MB run: first {first} s (server start, picture), re-run {again} s")
    print(f"cell output: {sizes[0]:.0f} kB, re-run {sizes[1]:.0f} kB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=100.0, help="size of the large run (default 100)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        os.environ["TMPDIR"] = folder
        tempfile.tempdir = folder
        root = Path(folder)
        servers(write_run(root / "tiny"))
        stop_all(root / "kernels")
        rerun(write_run(root / "large", args.megabytes))
        import trainer.board

        trainer.board.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
