"""`trainer.board.stop_all` and `stop` on real servers that other processes (notebook kernels, here
plain Python processes that stay alive) started, and what killed servers leave behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard.writer import FileWriter

from tests.processes import checkout_env
from trainer import board
from trainer.board import registry, servers

ROOT = Path(__file__).resolve().parent.parent
#: A "kernel": it shows a folder (starting its server) and lives on until it is told to end.
KERNEL = textwrap.dedent(
    """
    import sys, trainer.board
    server = trainer.board.show(sys.argv[1])  # prints its address
    print(server.pid, server.port, flush=True)
    sys.stdin.read()
    """
)


def write_run(folder: Path) -> Path:
    writer = FileWriter(str(folder))
    for step in (1, 2):
        writer.add_summary(Summary(value=[Summary.Value(tag="Loss/training loss", simple_value=1.0 / step)]), step)
    writer.close()
    return folder


def state(pid: int) -> str | None:
    """The state letter of process `pid` (``Z`` for a zombie), or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def temp(tmp_path, monkeypatch) -> Path:
    """A temporary folder of its own for this test, its registry and the processes it starts."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(os, "environ", checkout_env(TMPDIR=str(folder)))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    board.stop_all()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_stop_all_ends_four_servers_of_other_live_kernels_at_once_and_leaves_no_zombie(tmp_path, temp):
    """Four kernels (live processes) each start a server on a run directory. `stop_all` here stops
    all four: their ports close, each server is gone (its kernel reaped it: no zombie), their
    folders of links and registry entries are removed, then the empty registry folder."""
    kernels = [
        subprocess.Popen(
            [sys.executable, "-c", KERNEL, str(write_run(tmp_path / "runs" / f"run{index}"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=os.environ,
        )
        for index in range(4)
    ]
    try:
        addresses = [kernel.stdout.readline() for kernel in kernels]
        assert all(line.startswith("TensorBoard on ") for line in addresses), addresses
        started = [tuple(map(int, kernel.stdout.readline().split())) for kernel in kernels]
        assert len(started) == 4 and all(len(pair) == 2 for pair in started)
        assert sorted(server.pid for server in servers.running()) == sorted(pid for pid, _ in started)
        assert len(list(temp.glob("trainer-board-links-*"))) == 4
        began = time.monotonic()
        assert board.stop_all() == 4
        took = time.monotonic() - began
        for pid, port in started:
            assert not port_open(port)
            deadline = time.monotonic() + 5
            while state(pid) is not None and time.monotonic() < deadline:  # its kernel's thread reaps it
                time.sleep(0.05)
            assert state(pid) is None, f"server {pid} left as {state(pid)!r}"
        assert list(temp.iterdir()) == []  # no folder of links, no registry folder
        assert all(kernel.poll() is None for kernel in kernels)  # the kernels live on
        print(f"stop_all of 4 servers of other kernels: {took:.2f} s")
    finally:
        for kernel in kernels:
            kernel.communicate("", timeout=30)


def test_a_killed_servers_folder_of_links_is_removed_by_the_next_start_or_stop_all(tmp_path, temp):
    """A server killed with SIGKILL cannot clean up: its folder of links stays, and so does its
    registry entry. The next server started (or `stop_all`) removes that folder; a live server's
    folder and a folder that is not a folder of links are left alone; the dead entry is ignored."""
    run = write_run(tmp_path / "runs" / "killed")
    live = board.start(write_run(tmp_path / "runs" / "live"))
    killed = subprocess.Popen(
        [sys.executable, "-m", "trainer.board", str(run)], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    try:
        assert killed.stdout.readline().startswith(f"TensorBoard on {run}: ")
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        [left] = [
            path
            for path in temp.glob("trainer-board-links-*")
            if path.name.startswith(f"trainer-board-links-{killed.pid}-")
        ]
        assert [p.name for p in left.iterdir()] == ["killed"]
        other = temp / f"trainer-board-links-{killed.pid}-notlinks"
        other.mkdir()
        (other / "data.txt").write_text("not a link")
        assert servers.find(run) is None  # the dead entry is ignored (and removed)
        with board.start(run) as again:
            assert not left.exists() and (run / next(iter(os.listdir(run)))).exists()  # the run itself is untouched
            assert (other / "data.txt").exists()
            assert [path for path in temp.glob("trainer-board-links-*") if path != other and path.exists()] != []
        assert live.running and any(temp.glob(f"trainer-board-links-{os.getpid()}-*"))
        assert not again.running
    finally:
        live.stop()
    assert registry.registry_dir().exists()
    board.stop_all()
    assert sorted(p.name for p in temp.iterdir()) == [other.name]
