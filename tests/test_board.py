"""`trainer.board`: a real TensorBoard server on loopback, checked through its HTTP data API."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainer import Trainer, board, board_servers
from trainer.callbacks import GraphCallback, ImageGridCallback, TensorBoardCallback

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 30.0  # bound on every wait for the server; it normally answers in well under a second
# A tiny run of 2 epochs x 2 batches logs the running loss at every optimizer step (1..4) and
# the epoch logs at each epoch's last step (2, 4); the image grid and the graph come at fit start.
SCALAR_STEPS = {"Loss/training loss": [1, 2, 3, 4], "Loss/training (epoch mean)": [2, 4], "Loss/validation": [2, 4]}


# ----------------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_text(url: str, route: str, **params: str) -> str:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{url.rstrip('/')}/{route}{query}", timeout=5) as response:
        return response.read().decode()


def get_json(url: str, route: str, **params: str):
    return json.loads(get_text(url, route, **params))


def post_json(url: str, route: str, body: dict):
    request = urllib.request.Request(
        f"{url.rstrip('/')}/{route}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read().decode())


def poll_json(url: str, route: str, ready, **params: str):
    """GET `route` until `ready(data)` holds: the server loads event files in the background."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        data = get_json(url, route, **params)
        if ready(data):
            return data
        if time.monotonic() > deadline:
            raise AssertionError(f"{route} {params} never got ready within {TIMEOUT} s; last answer: {data}")
        time.sleep(0.1)


def read_line(proc: subprocess.Popen) -> str:
    """The first stdout line of `proc`, failing (with its stderr) if none comes within TIMEOUT."""
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(TIMEOUT)
    if not result or not result[0]:
        proc.kill()
        raise AssertionError(f"no URL printed within {TIMEOUT} s; stderr: {proc.communicate()[1]}")
    return result[0]


def assert_scalars_served(url: str, run: str) -> None:
    """The tiny run's scalar tags, each with its steps, are served under `run`."""
    tags = poll_json(url, "data/plugin/scalars/tags", lambda d: set(SCALAR_STEPS) <= set(d.get(run, {})))
    assert set(SCALAR_STEPS) <= set(tags[run])
    for tag, steps in SCALAR_STEPS.items():
        count = len(steps)
        points = poll_json(url, "data/plugin/scalars/scalars", lambda d, n=count: len(d) >= n, run=run, tag=tag)
        assert [step for _, step, _ in points] == steps  # each point is [wall_time, step, value]


def tiny_loaders() -> tuple[DataLoader, DataLoader]:
    """Training (8 samples, 2 batches) and validation (4 samples) loaders of 8x8 images."""
    torch.manual_seed(0)
    images = torch.rand(12, 1, 8, 8)
    data = TensorDataset(images, images.mean(dim=(1, 2, 3)).gt(0.5).long())
    return DataLoader(data, batch_size=4, sampler=range(8)), DataLoader(data, batch_size=4, sampler=range(8, 12))


def tiny_trainer(callbacks: list, epochs: int = 2) -> Trainer:
    """A tiny CNN on 8x8 images with `callbacks`, for `epochs` epochs of 2 steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 8 * 8, 2))
    return Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        nn.functional.cross_entropy,
        callbacks=callbacks,
        max_epochs=epochs,
        device="cpu",
    )


def train_tiny_run(log_dir: Path) -> Trainer:
    """Two epochs of a tiny CNN on 8x8 images, logged by the TensorBoard callbacks."""
    t = tiny_trainer(
        [
            TensorBoardCallback(log_dir, every_n_steps=1),
            ImageGridCallback(log_dir, num_images=4),
            GraphCallback(log_dir),
        ]
    )
    t.fit(*tiny_loaders())
    assert t.global_step == 4
    return t


@pytest.fixture(scope="module")
def runs(tmp_path_factory, module_mocker) -> Path:
    """A folder of runs holding one run, ``runs/tiny``, trained with TorchScript failing (its graph
    comes from torch.export)."""
    gone = RuntimeError("TorchScript is not available")
    module_mocker.patch("torch.jit.trace", side_effect=gone)
    module_mocker.patch("torch.jit.script", side_effect=gone)
    root = tmp_path_factory.mktemp("runs")
    train_tiny_run(root / "tiny")
    return root


# ----------------------------------------------------------------------------------- tests
def test_find_event_files(runs, tmp_path):
    found = board.find_event_files(runs)
    assert len(found) == 1 and found[0].parent == runs / "tiny"
    assert found[0].name.startswith("events.out.tfevents.")
    assert board.find_event_files(found[0]) == found
    assert board.find_event_files(tmp_path) == []


def test_command_line_serves_scalars_images_and_graph(runs):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.board", str(runs), "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = read_line(proc)
        assert line == f"TensorBoard on {runs}: http://127.0.0.1:{port}/\n"
        url = line.split(": ", 1)[1].strip()

        assert poll_json(url, "data/runs", lambda d: "tiny" in d) == ["tiny"]
        assert_scalars_served(url, "tiny")
        images = poll_json(url, "data/plugin/images/tags", lambda d: "images" in d.get("tiny", {}))
        assert images["tiny"]["images"]["samples"] == 1
        meta = get_json(url, "data/plugin/images/images", run="tiny", tag="images")
        assert [item["step"] for item in meta] == [0]
        graphs = poll_json(url, "data/plugin/graphs/info", lambda d: d.get("tiny", {}).get("run_graph"))
        assert graphs["tiny"]["run_graph"] is True
        graph = get_text(url, "data/plugin/graphs/graph", run="tiny")  # the run graph, as pbtxt
        assert 'name: "Sequential/0/conv2d"' in graph and 'op: "aten::conv2d"' in graph
        assert 'input: "Sequential/0/weight"' in graph and 'key: "_output_shapes"' in graph
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "TensorFlow installation not found" not in stderr


def test_start_serves_a_run_directory_named_after_its_folder_and_stop_frees_the_port(runs):
    b = board.start(runs / "tiny")
    try:
        assert b.url == f"http://127.0.0.1:{b.port}/" and b.path == runs / "tiny" and b.running
        assert poll_json(b.url, "data/runs", lambda d: "tiny" in d) == ["tiny"]  # not "."
        assert get_json(b.url, "data/environment")["data_location"] == str(runs / "tiny")  # not the link's folder
        assert_scalars_served(b.url, "tiny")
        # The HParams tab's trial is the run, under the same name.
        groups = post_json(
            b.url,
            "data/plugin/hparams/session_groups",
            {
                "experimentName": "",
                "allowedStatuses": ["STATUS_SUCCESS", "STATUS_UNKNOWN"],
                "colParams": [],
                "startIndex": 0,
                "sliceSize": 10,
            },
        )
        assert [group["name"] for group in groups["sessionGroups"]] == ["tiny"]
    finally:
        b.stop()
    b.stop()  # a second stop does nothing
    assert not b.running
    # Nothing answers: refused, or reset when loopback reuses a TIME_WAIT address pair.
    with pytest.raises(OSError):
        urllib.request.urlopen(b.url, timeout=5).read()
    with socket.socket() as sock:  # the listening socket is gone: the port can be bound again
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", b.port))


def test_a_folder_of_runs_names_them_by_their_relative_paths(runs, tmp_path):
    folder = tmp_path / "runs"
    for name in ("nested_unet/a", "nested_unet/b", "fashion_mnist/a"):
        (folder / name).mkdir(parents=True)
        for source in (runs / "tiny").glob("events.out.tfevents.*"):
            (folder / name / source.name).write_bytes(source.read_bytes())
    with board.start(folder) as b:
        expected = ["fashion_mnist/a", "nested_unet/a", "nested_unet/b"]
        assert sorted(poll_json(b.url, "data/runs", lambda d: len(d) == 3)) == expected
    with board.start(folder / "nested_unet" / "b") as b:  # one of them alone: named after its folder
        assert poll_json(b.url, "data/runs", lambda d: d) == ["b"]
        assert "Loss/training loss" in poll_json(b.url, "data/plugin/scalars/tags", lambda d: d.get("b"))["b"]


def test_start_on_a_given_port_and_as_a_context_manager(runs):
    port = free_port()
    with board.start(runs, port=port) as b:
        assert b.port == port and b.url == f"http://127.0.0.1:{port}/"
        assert get_json(b.url, "data/environment")["data_location"] == str(runs)
    assert not b.running


def test_start_on_a_busy_port_is_a_clear_error(runs):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"could not serve .* on 127.0.0.1:{port}: .*already in use"):
            board.start(runs, port=port)


@pytest.mark.parametrize("kind", ["missing", "empty", "file"])
def test_python_api_rejects_paths_without_event_files(tmp_path, kind):
    path = tmp_path / "logs"
    if kind == "empty":
        (path / "run" / "nested").mkdir(parents=True)
        (path / "run" / "notes.txt").write_text("no events here")
    elif kind == "file":
        path.write_text("not a directory")
    error = FileNotFoundError if kind == "missing" else ValueError
    with pytest.raises(error, match="event files") as info:
        board.start(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_command_line_rejects_a_missing_path(tmp_path):
    missing = tmp_path / "nope"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.board", str(missing)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "holds no TensorBoard event files" in lines[0]


def test_main_rejects_a_folder_without_event_files(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert board.main([str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and str(tmp_path) in err and "holds no TensorBoard event files" in err


@pytest.fixture
def registry(tmp_path, monkeypatch) -> Path:
    """A temporary folder of its own for this test and the servers it starts (their registry,
    their folders of links), so that what they leave behind can be checked."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_show_outside_a_notebook_prints_the_url_and_reuses_one_server_per_folder(runs, registry, capsys):
    run = runs / "tiny"
    first = board.show(run)
    try:
        second = board.show(run)  # the cell run again: the same server
        assert second == first and first.path == str(run.resolve())
        assert capsys.readouterr().out == f"TensorBoard on {first.path}: {first.url}\n" * 2
        assert poll_json(first.url, "data/runs", lambda d: d) == ["tiny"]
        assert get_json(first.url, "data/environment")["data_location"] == str(run)  # no temporary path
        assert [server.pid for server in board_servers.running()] == [first.pid]
    finally:
        assert board.stop(run)
    assert not board.stop(run)  # nothing left to stop
    with pytest.raises(OSError):
        urllib.request.urlopen(first.url, timeout=5).read()
    assert board_servers.running() == [] and list(registry.rglob("*")) == [board_servers.registry_dir()]


def test_a_stale_registry_entry_is_ignored_and_removed(runs, registry):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    board_servers.register(
        board_servers.BoardServer(str(runs), dead.pid, free_port(), "127.0.0.1", "http://127.0.0.1:1/")
    )
    assert board_servers.find(runs) is None and not board_servers.entry_path(runs).exists()


def test_show_rejects_a_bad_proxy_url_before_starting_a_server(runs, registry):
    with pytest.raises(ValueError, match="proxy_url must hold %PORT%"):
        board.show(runs, proxy_url="https://lab.example.org/tb/")
    assert board_servers.running() == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_command_line_stopped_by_a_signal_removes_its_temporary_files(runs, registry, sig):
    run = runs / "tiny"
    env = {**os.environ, "TMPDIR": str(registry)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.board", str(run)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = read_line(proc).split(": ", 1)[1].strip()
        assert len(list(registry.glob("trainer-board-*/tiny"))) == 1  # the link that names the run
        assert board_servers.find(run).url == url  # recorded: a notebook's show() would reuse it
    finally:
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    assert list(registry.rglob("*")) == [board_servers.registry_dir()]


# ------------------------------------------------------------------- resumed runs on the board
def scalar_steps_served(url: str, run: str, tag: str, count: int) -> list[tuple[int, float]]:
    """(step, value) of each point of `tag` in `run` as the server answers, once it has `count`."""
    points = poll_json(url, "data/plugin/scalars/scalars", lambda d: len(d) >= count, run=run, tag=tag)
    return [(step, value) for _, step, value in points]


def test_a_killed_and_resumed_run_is_one_curve_per_tag_on_the_board(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from trainer.callbacks import ModelCheckpoint

    run = tmp_path / "run"
    first = tiny_trainer([TensorBoardCallback(run, every_n_steps=1), ModelCheckpoint(run)], epochs=2)
    first.fit(*tiny_loaders())
    # The killed process went on past its last checkpoint (step 4): these points are orphans.
    with SummaryWriter(run) as orphan:
        for step in (5, 6):
            orphan.add_scalar("Loss/training loss", 99.0, step)
    resumed = tiny_trainer([TensorBoardCallback(run, every_n_steps=1), ModelCheckpoint(run)], epochs=4)
    resumed.fit(*tiny_loaders(), resume_from=run / "last.pt")
    with board.start(run) as b:
        points = scalar_steps_served(b.url, "run", "Loss/training loss", 8)
        assert [step for step, _ in points] == list(range(1, 9))  # one value per step, in order
        assert 99.0 not in [value for _, value in points]
        epochs = scalar_steps_served(b.url, "run", "Loss/training (epoch mean)", 4)
        assert [step for step, _ in epochs] == [2, 4, 6, 8]
        assert [value for _, value in epochs] == pytest.approx([h["loss"] for h in resumed.history])


def test_a_fit_rerun_into_a_used_folder_is_a_second_run_beside_the_first(tmp_path, capsys):
    run = tmp_path / "run"
    first = tiny_trainer([TensorBoardCallback(run, every_n_steps=1)])
    first.fit(*tiny_loaders())
    again = tiny_trainer([TensorBoardCallback(run, every_n_steps=1)])  # the notebook cell, run again
    again.fit(*tiny_loaders())
    assert f"{run} already holds a run, so this one logs to {run / 'version_1'}" in capsys.readouterr().out
    with board.start(run) as b:
        assert sorted(poll_json(b.url, "data/runs", lambda d: len(d) == 2)) == ["run", "run/version_1"]
        for name in ("run", "run/version_1"):
            assert [step for step, _ in scalar_steps_served(b.url, name, "Loss/training loss", 4)] == [1, 2, 3, 4]


def test_show_on_a_busy_port_is_the_servers_one_line_error(runs, registry):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"could not serve .* on 127.0.0.1:{port}: .*already in use") as info:
            board.show(runs, port=port)
    assert "\n" not in str(info.value) and board_servers.running() == []
