"""`trainer.board`: a real TensorBoard server on loopback, checked through its HTTP data API."""

from __future__ import annotations

import contextlib
import dataclasses
import html
import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

from trainer import Trainer, board
from trainer.board import cli, processes
from trainer.board import registry as board_registry
from trainer.board import servers as board_servers
from trainer.board.frontends import script_json
from trainer.callbacks import GraphCallback, ImageGridCallback, ModelCheckpoint, TensorBoardCallback
from trainer.event_files import find_event_files

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


#: The modules of the board (`trainer.board` and what it imports), all a server process loads of `trainer`.
BOARD_MODULES = (
    "atomic",
    "board",
    *(f"board.{name}" for name in ("cell", "cli", "frontends", "notebook", "processes")),
    *(f"board.{name}" for name in ("registry", "server", "servers", "snapshot")),
    "event_files",
    "openmp",
)


@contextlib.contextmanager
def serving(run: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """``python -m trainer.board RUN`` as a process, with its URL once it serves; ended after the block."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.board", str(run)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc, read_line(proc).split(": ", 1)[1].strip()
    finally:
        proc.terminate()
        proc.communicate(timeout=TIMEOUT)


def assert_scalars_served(url: str, run: str) -> None:
    """The tiny run's scalar tags, each with its steps, are served under `run`."""
    tags = poll_json(url, "data/plugin/scalars/tags", lambda d: set(SCALAR_STEPS) <= set(d.get(run, {})))
    assert set(SCALAR_STEPS) <= set(tags[run])
    for tag, steps in SCALAR_STEPS.items():
        count = len(steps)
        points = poll_json(url, "data/plugin/scalars/scalars", lambda d, n=count: len(d) >= n, run=run, tag=tag)
        assert [step for _, step, _ in points] == steps  # each point is [wall_time, step, value]


@contextlib.contextmanager
def sigint_as_from_a_terminal():
    """Processes started in the block get SIGINT at its default, as from a terminal, so that Ctrl-C
    reaches their Python as KeyboardInterrupt. A background job of a shell (``make test &``, nohup)
    runs this process with SIGINT ignored, which a child would inherit and Python then keep."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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
    """The event files in or below a folder, or the file itself; none in a folder without them."""
    found = find_event_files(runs)
    assert len(found) == 1 and found[0].parent == runs / "tiny"
    assert found[0].name.startswith("events.out.tfevents.")
    assert find_event_files(found[0]) == found
    assert find_event_files(tmp_path) == []


def test_start_serves_a_run_directory_named_after_its_folder_and_stop_frees_the_port(runs):
    """`start` on a run directory, on a given port and as a context manager: the run is named after its
    folder (not "."), its scalars and its HParams trial are served, and leaving the block stops the
    server for good (a second stop does nothing) and frees the port."""
    port = free_port()
    with board.start(runs / "tiny", port=port) as b:
        assert b.url == f"http://127.0.0.1:{port}/" and b.port == port and b.path == runs / "tiny" and b.running
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
    assert not b.running
    b.stop()  # a second stop does nothing
    assert not b.running
    # Nothing answers: refused, or reset when loopback reuses a TIME_WAIT address pair.
    with pytest.raises(OSError):
        urllib.request.urlopen(b.url, timeout=5).read()
    with socket.socket() as sock:  # the listening socket is gone: the port can be bound again
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", b.port))


def test_a_folder_of_runs_names_them_by_their_relative_paths(runs, tmp_path):
    """`start` on a folder of runs, on a free port it picks: each run is named by its path relative to
    the folder, which is the data location."""
    folder = tmp_path / "runs"
    for name in ("nested_unet/a", "nested_unet/b", "fashion_mnist/a"):
        (folder / name).mkdir(parents=True)
        for source in (runs / "tiny").glob("events.out.tfevents.*"):
            (folder / name / source.name).write_bytes(source.read_bytes())
    with board.start(folder) as b:
        assert b.url == f"http://127.0.0.1:{b.port}/" and b.port > 0
        expected = ["fashion_mnist/a", "nested_unet/a", "nested_unet/b"]
        assert sorted(poll_json(b.url, "data/runs", lambda d: len(d) == 3)) == expected
        assert get_json(b.url, "data/environment")["data_location"] == str(folder)
        tags = poll_json(b.url, "data/plugin/scalars/tags", lambda d: d.get("nested_unet/b"))
        assert "Loss/training loss" in tags["nested_unet/b"]


def test_start_on_a_busy_port_is_a_clear_error(runs):
    """`start` on a port another socket holds: an OSError naming the folder, the address and why."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"could not serve .* on 127.0.0.1:{port}: .*already in use"):
            board.start(runs, port=port)


@pytest.mark.parametrize("kind", ["missing", "empty", "file"])
def test_python_api_rejects_paths_without_event_files(tmp_path, kind):
    """`start` on a missing path, a folder without event files or a file: a one-line error naming it."""
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


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_command_line_rejects_a_path_without_event_files(tmp_path, capsys, kind):
    """``python -m trainer.board PATH`` (its `main`) on a missing folder or one without event files: exit
    code 2 and one line on stderr naming the path, nothing on stdout."""
    path = tmp_path / "nope"
    if kind == "empty":
        (path / "run").mkdir(parents=True)
    assert cli.main([str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and str(path) in err and "holds no TensorBoard event files" in err


@pytest.fixture
def registry(tmp_path, monkeypatch) -> Iterator[Path]:
    """A temporary folder of its own for this test and the servers it starts (their registry,
    their folders of links), so that what they leave behind can be checked; a server still running
    at the end is stopped."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    with contextlib.suppress(OSError):  # a registry the test made unusable holds none
        board.stop_all()


def test_command_line_serves_a_run_show_reuses_it_and_ctrl_c_removes_its_files(runs, registry, capsys):
    """``python -m trainer.board RUN --port P`` prints its URL and serves the run's scalars, image grid
    and graph under the run's name. It records itself, so `show` on the same folder (here from another
    process, as a re-run cell or a restarted kernel calls it) reuses it, twice, and prints its URL.
    Ctrl-C (SIGINT) ends it with exit code 0 and no traceback, and it removes its registry entry and
    its folder of links."""
    run, port = runs / "tiny", free_port()
    with sigint_as_from_a_terminal():
        proc = subprocess.Popen(
            [sys.executable, "-m", "trainer.board", str(run), "--port", str(port)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        line = read_line(proc)
        assert line == f"TensorBoard on {run}: http://127.0.0.1:{port}/\n"
        url = line.split(": ", 1)[1].strip()

        assert poll_json(url, "data/runs", lambda d: "tiny" in d) == ["tiny"]
        assert get_json(url, "data/environment")["data_location"] == str(run)  # no temporary path
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

        assert len(list(registry.glob("trainer-board-*/tiny"))) == 1  # the link that names the run
        first = board.show(run)
        assert board.show(run) == first and (first.pid, first.url) == (proc.pid, url)
        assert first.path == str(run.resolve())
        assert capsys.readouterr().out == f"TensorBoard on {first.path}: {url}\n" * 2
        assert [server.pid for server in board_servers.running()] == [proc.pid]
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
    assert list(registry.rglob("*")) == [board_registry.registry_dir()]  # no entry, no folder of links
    assert board_servers.running() == [] and not board.stop(run)  # nothing left to stop
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=5).read()


def test_a_stale_registry_entry_is_ignored_and_removed(runs, registry):
    """An entry whose process is gone is not a server: `find` ignores it and removes it."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    port = free_port()
    board_servers.register(
        board_servers.BoardServer(str(runs), dead.pid, port, "127.0.0.1", board_servers.server_url("127.0.0.1", port))
    )
    assert board_registry.entry_path(runs).exists()
    assert board_servers.find(runs) is None and not board_registry.entry_path(runs).exists()


def test_show_rejects_a_bad_proxy_url_before_starting_a_server(runs, registry):
    """A proxy URL without %PORT% is refused before any server starts."""
    with pytest.raises(ValueError, match="proxy_url must hold %PORT%"):
        board.show(runs, proxy_url="https://lab.example.org/tb/")
    assert board_servers.running() == []


def test_show_on_a_busy_port_is_the_servers_one_line_error(runs, registry):
    """The server `show` starts cannot bind a busy port: its own one-line error is raised, and nothing
    is recorded."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"could not serve .* on 127.0.0.1:{port}: .*already in use") as info:
            board.show(runs, port=port)
    assert "\n" not in str(info.value) and board_servers.running() == []


# ------------------------------------------------------------------- a machine shared with other users
OTHER_UID = 65534  # nobody: the other user of a shared machine


def as_another_user(path: Path) -> None:
    """Give `path` to another user (root only: a test that needs it skips elsewhere)."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to give a folder to another user")
    os.chown(path, OTHER_UID, OTHER_UID)


@pytest.mark.parametrize("kind", ["another user's", "open to all", "symbolic link"])
def test_a_registry_folder_others_could_plant_in_is_refused_in_one_line(runs, registry, mocker, capsys, kind):
    """A registry folder someone made before this user (another user's, one anyone can write in, a
    symbolic link to another folder) is never used: `show`, `stop_all` and ``python -m trainer.board``
    refuse in one line naming the folder, what is wrong and what to do, start no server, read none of
    its entries and leave it as it is."""
    folder = board_registry.registry_dir()
    elsewhere = registry / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    planted = board_servers.BoardServer(str(runs), os.getpid(), 1, "127.0.0.1", "http://127.0.0.1:1/")
    if kind == "symbolic link":
        folder.symlink_to(elsewhere)
        reason = "is a symbolic link"
    else:
        folder.mkdir()
        os.chmod(folder, 0o777 if kind == "open to all" else 0o755)
        reason = "can be written by other users (mode 0777)" if kind == "open to all" else "belongs to uid 65534"
    (elsewhere if kind == "symbolic link" else folder).joinpath("planted.json").write_text(json.dumps(asdict(planted)))
    if kind == "another user's":
        as_another_user(folder)
    before = os.lstat(folder)
    popen = mocker.spy(subprocess, "Popen")
    for call in (lambda: board.show(runs), board.stop_all, lambda: board.stop(runs)):
        with pytest.raises(PermissionError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and f"registry {folder} {reason}" in message and "set TMPDIR" in message
    assert cli.main([str(runs / "tiny")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and f"error: the TensorBoard server registry {folder} {reason}" in err
    popen.assert_not_called()
    after = os.lstat(folder)
    assert (after.st_mode, after.st_uid) == (before.st_mode, before.st_uid)  # left as it was
    assert [p.name for p in (elsewhere if kind == "symbolic link" else folder).iterdir()] == ["planted.json"]


def test_an_own_registry_folder_others_can_read_is_made_private(registry):
    """This user's own registry folder that others can read (as an older version made it) is kept,
    and made private (0700)."""
    folder = board_registry.registry_dir()
    folder.mkdir()
    os.chmod(folder, 0o755)
    assert board_servers.running() == []
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


@dataclass
class SharedBoard:
    """`server`: a real server that `show` started on `folder` (whose name is hostile to HTML), with
    its registry in the temporary folder `temp`."""

    server: board_servers.BoardServer
    folder: Path
    temp: Path


def use_temporary_folder(patch: pytest.MonkeyPatch, folder: Path) -> None:
    patch.setenv("TMPDIR", str(folder))
    patch.setattr(tempfile, "tempdir", str(folder))


@pytest.fixture(scope="module")
def shared_board(runs, tmp_path_factory):
    """One server for the tests of planted entries, started by `show` on a folder whose path holds
    quotes, ``&``, ``</script><script>alert(1)</script>`` and ``<!--``; stopped at the end."""
    root = tmp_path_factory.mktemp("shared")
    temp, folder = root / "tmp", root / "a'b\"c&d" / "</script><script>alert(1)</script><!--"
    temp.mkdir()
    folder.mkdir(parents=True)
    for source in (runs / "tiny").glob("events.out.tfevents.*"):
        (folder / source.name).write_bytes(source.read_bytes())
    with pytest.MonkeyPatch.context() as patch:
        use_temporary_folder(patch, temp)
        server = board.show(folder)
    yield SharedBoard(server, folder, temp)
    with pytest.MonkeyPatch.context() as patch:
        use_temporary_folder(patch, temp)
        board.stop_all()


@pytest.fixture
def shared(shared_board, monkeypatch):
    """The shared server's registry, as this test's temporary folder; its entry is put back after."""
    use_temporary_folder(monkeypatch, shared_board.temp)
    yield shared_board
    if shared_board.server.answers():
        board_servers.register(shared_board.server)


@pytest.fixture
def sleeper():
    """Another process of this user, which nothing here may end."""
    process = subprocess.Popen(["sleep", "30"])
    yield process
    process.kill()
    process.wait()


def test_the_registry_and_its_entries_are_private(shared):
    """Nothing of the registry can be read by other users: the folder is 0700, an entry 0600; the
    server's folder of links is 0700 too."""
    folder = board_registry.registry_dir()
    entry = board_registry.entry_path(shared.folder)
    assert (folder.stat().st_uid, stat.S_IMODE(folder.stat().st_mode)) == (os.getuid(), 0o700)
    assert (entry.stat().st_uid, stat.S_IMODE(entry.stat().st_mode)) == (os.getuid(), 0o600)
    [links] = [path for path in shared.temp.glob("trainer-board-*") if path != folder]
    assert stat.S_IMODE(links.stat().st_mode) == 0o700


def test_show_writes_a_hostile_folder_name_as_text_in_the_cell(shared, mocker):
    """`show` in a notebook, on the folder named with ``</script><script>alert(1)</script>``: it
    reuses the server, and its cell has one script, which the name does not end; the note names the
    folder as text."""
    mocker.patch("trainer.board.notebook.in_notebook", return_value=True)
    display = mocker.patch("IPython.display.display")
    assert board.show(shared.folder) == shared.server
    [bundle] = display.call_args.args
    page = bundle["text/html"]
    assert page.count("<script") == 1 and page.count("</script") == 1 and "<!--" not in page
    assert html.escape(str(shared.folder), quote=True) in page[: page.index("<script>")]
    script = page[page.index("<script>") + len("<script>") : page.index("</script>")]
    assert script_json(html.escape(str(shared.folder), quote=True))[1:-1] in script  # as text in the note


def planted_entries(server: board_servers.BoardServer, other: int) -> dict[str, object]:
    """Entries filed under the shared folder's key that do not prove a server of this user on it;
    `other` is the pid of another process of this user."""
    real = asdict(server)
    return {
        "pid of another process of yours": {**real, "pid": other},
        "port with markup": {**real, "port": f"{server.port} onerror=alert(1)"},
        "pid as text": {**real, "pid": str(server.pid)},
        "pid 0": {**real, "pid": 0},
        "address of another host": {**real, "url": f"http://localhost:{server.port}/"},
        "path of a missing folder": {**real, "path": str(Path(server.path) / "missing")},
        "path as a number": {**real, "path": 42},
        "extra field": {**real, "command": "sleep"},
        "not an object": [real],
        "malformed JSON": '{"path": ',
    }


@pytest.mark.parametrize("kind", [*planted_entries(board_servers.BoardServer("/", 1, 1, "", ""), 1), "symbolic link"])
def test_an_entry_that_does_not_prove_its_server_is_ignored_removed_and_stops_nothing(shared, sleeper, kind):
    """An entry for the folder whose fields have the wrong types or values, whose pid is another
    process of this user (while the port it names answers as the server of that folder), or which is
    a symbolic link to a valid entry, is no server: `find` ignores it and removes it, `stop` and
    `stop_all` end nothing, and no call raises."""
    entry = board_registry.entry_path(shared.folder)

    def plant() -> None:
        entry.unlink(missing_ok=True)
        if kind == "symbolic link":
            target = shared.temp / "valid.json"
            target.write_text(json.dumps(asdict(shared.server)))
            entry.symlink_to(target)
        else:
            content = planted_entries(shared.server, sleeper.pid)[kind]
            entry.write_text(content if isinstance(content, str) else json.dumps(content))

    plant()
    assert board_servers.find(shared.folder) is None
    assert not entry.exists() and not entry.is_symlink()
    plant()
    assert board.stop(shared.folder) is False and board.stop_all() == 0 and board_servers.running() == []
    assert sleeper.poll() is None and shared.server.answers()  # both still run
    assert list(board_registry.registry_dir().iterdir()) == []


def test_another_users_entry_is_ignored(shared):
    """A valid entry of the shared server, but a file of another user (as root can hand it over):
    ignored and left, as it cannot be this user's."""
    entry = board_registry.entry_path(shared.folder)
    as_another_user(entry)
    assert board_servers.find(shared.folder) is None and board_servers.running() == []
    assert entry.exists()
    entry.unlink()


def test_a_board_server_of_another_user_is_never_stopped(shared, tmp_path):
    """A process of another user whose command line is ``python -m trainer.board FOLDER``, filed with
    the port that answers as the server of that folder: not this user's, so never stopped (root could)."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run a process as another user")
    (tmp_path / "trainer").mkdir()
    (tmp_path / "trainer" / "__init__.py").write_text("")
    (tmp_path / "trainer" / "board.py").write_text(  # becomes the other user, then waits
        f"import os, time\nos.setgid({OTHER_UID})\nos.setuid({OTHER_UID})\nprint('ready', flush=True)\ntime.sleep(30)\n"
    )
    command = [sys.executable, "-m", "trainer.board", str(shared.folder), "--host", "127.0.0.1"]
    other = subprocess.Popen(command, cwd=tmp_path, env={"PATH": os.defpath}, stdout=subprocess.PIPE, text=True)
    try:
        assert read_line(other) == "ready\n"
        board_servers.register(dataclasses.replace(shared.server, pid=other.pid))
        assert board_servers.find(shared.folder) is None and board.stop_all() == 0
        assert other.poll() is None and shared.server.answers()
    finally:
        other.kill()
        other.wait()


def test_without_proc_the_process_is_proven_by_ps(shared, sleeper, monkeypatch, tmp_path):
    """Where there is no /proc (macOS, BSD), ``ps`` gives the command line: the server is found, an
    entry naming another process of this user is not."""
    monkeypatch.setattr(processes, "PROC", tmp_path / "no-proc")
    assert board_servers.find(shared.folder) == shared.server
    board_servers.register(dataclasses.replace(shared.server, pid=sleeper.pid))
    assert board_servers.find(shared.folder) is None and board.stop_all() == 0
    assert sleeper.poll() is None


def test_stop_all_beside_planted_entries_stops_the_server_alone(shared, sleeper):
    """Planted entries beside the real one (a folder named like markup, a pid of another process of
    this user, wrong types, malformed JSON): `stop_all` stops the real server alone, leaves the other
    process running and removes every entry."""
    registry_folder = board_registry.registry_dir()
    other = shared.folder.parent.parent  # "a'b\"c&d/<": a folder named like markup
    bad = [
        {**asdict(shared.server), "path": os.fspath(other), "pid": sleeper.pid},
        {**asdict(shared.server), "path": 42},
        {**asdict(shared.server), "port": "6006 onerror=alert(1)"},
    ]
    for index, entry in enumerate(bad):
        (registry_folder / f"planted-{index}.json").write_text(json.dumps(entry))
    board_registry.entry_path(other).write_text(json.dumps(bad[0]))
    (registry_folder / "broken.json").write_text('{"path": ')
    assert board.stop_all() == 1
    assert not shared.server.answers() and sleeper.poll() is None
    with pytest.raises(ProcessLookupError):
        os.kill(shared.server.pid, 0)
    assert not registry_folder.exists()  # every entry removed, then the empty folder


# ------------------------------------------------------------------- continued runs on the board
@dataclass
class ContinuedRuns:
    """`root`: a folder of continued runs, served at `url`; `printed`: what their fits printed;
    `history`: the resumed run's epoch logs."""

    root: Path
    url: str
    printed: str
    history: list[dict]


@pytest.fixture(scope="module")
def continued_runs(tmp_path_factory):
    """One board on a folder of the two runs a user continues: ``resumed``, whose process went on
    logging past its last checkpoint (step 4) before it was killed, then resumed to 4 epochs; and
    ``rerun``, where a second fit of the same callbacks (a notebook cell run again) logs beside the first."""
    root = tmp_path_factory.mktemp("continued")
    resumed, rerun = root / "resumed", root / "rerun"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        tiny_trainer([TensorBoardCallback(resumed, every_n_steps=1), ModelCheckpoint(resumed)]).fit(*tiny_loaders())
        with SummaryWriter(resumed) as orphan:  # the killed process's points after its checkpoint
            for step in (5, 6):
                orphan.add_scalar("Loss/training loss", 99.0, step)
        trainer = tiny_trainer([TensorBoardCallback(resumed, every_n_steps=1), ModelCheckpoint(resumed)], epochs=4)
        trainer.fit(*tiny_loaders(), resume_from=resumed / "last.pt")
        for _ in range(2):
            tiny_trainer([TensorBoardCallback(rerun, every_n_steps=1)]).fit(*tiny_loaders())
    with board.start(root) as b:
        yield ContinuedRuns(root, b.url, printed.getvalue(), trainer.history)


def scalar_steps_served(url: str, run: str, tag: str, count: int) -> list[tuple[int, float]]:
    """(step, value) of each point of `tag` in `run` as the server answers, once it has `count`."""
    points = poll_json(url, "data/plugin/scalars/scalars", lambda d: len(d) >= count, run=run, tag=tag)
    return [(step, value) for _, step, value in points]


def test_a_killed_and_resumed_run_is_one_curve_per_tag_on_the_board(continued_runs):
    """The killed process's points past its last checkpoint are gone: one value per step, in order,
    and the epoch means are the resumed run's."""
    points = scalar_steps_served(continued_runs.url, "resumed", "Loss/training loss", 8)
    assert [step for step, _ in points] == list(range(1, 9))  # one value per step, in order
    assert 99.0 not in [value for _, value in points]
    epochs = scalar_steps_served(continued_runs.url, "resumed", "Loss/training (epoch mean)", 4)
    assert [step for step, _ in epochs] == [2, 4, 6, 8]
    assert [value for _, value in epochs] == pytest.approx([h["loss"] for h in continued_runs.history])


def test_a_fit_rerun_into_a_used_folder_is_a_second_run_beside_the_first(continued_runs):
    """A second fit into a folder that holds a run says so and logs to ``version_1``: two runs of
    four steps each on the board."""
    run = continued_runs.root / "rerun"
    assert f"{run} already holds a run, so this one logs to {run / 'version_1'}" in continued_runs.printed
    runs = poll_json(continued_runs.url, "data/runs", lambda d: len(d) == 3)
    assert sorted(runs) == ["rerun", "rerun/version_1", "resumed"]
    for name in ("rerun", "rerun/version_1"):
        steps = [step for step, _ in scalar_steps_served(continued_runs.url, name, "Loss/training loss", 4)]
        assert steps == [1, 2, 3, 4]


def test_the_server_command_never_loads_torch_nor_the_training_code(runs, registry):
    """``python -m trainer.board`` imports the board's modules only: no torch (whose import costs a
    server about 0.5 GB of memory and 2 s at each start; none of its libraries is mapped in the
    serving process) and none of the trainer's training code."""
    code = (
        "import sys, runpy; from tensorboard import program; "
        "import trainer.board, trainer.board.cli, trainer.board.servers, trainer.board.cell, trainer.board.snapshot; "
        "print(sorted(n for n in sys.modules if n.split('.')[0] == 'torch' or n.startswith('trainer.')))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout.replace("'", '"')))
    assert loaded <= {f"trainer.{name}" for name in BOARD_MODULES}, loaded
    with serving(runs / "tiny") as (proc, url):
        maps = Path(f"/proc/{proc.pid}/maps").read_text() if Path("/proc").is_dir() else ""
        assert "torch" not in maps and get_json(url, "data/runs") == ["tiny"]
