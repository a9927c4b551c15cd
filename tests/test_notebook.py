"""`trainer.board.show` in a real Jupyter kernel (nbclient + ipykernel): a notebook trains a tiny
run and shows it twice (one server answers); the kernel is then shut down as a restart shuts it down
(an interrupt and a kill of its process group) and the server lives on, found again by the next `show`;
once the server is stopped, the saved notebook holds a picture of the run and what to run."""

from __future__ import annotations

import base64
import json
import os
import re
import urllib.request

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from tests.processes import checkout_env  # noqa: E402
from trainer import board  # noqa: E402
from trainer.board import servers as board_servers  # noqa: E402

TRAIN = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from trainer import Trainer
from trainer.callbacks import ImageGridCallback, ProgressBar, TensorBoardCallback

torch.manual_seed(0)
x = torch.rand(16, 1, 8, 8)
loader = DataLoader(TensorDataset(x, x.mean(dim=(1, 2, 3)).gt(0.5).long()), batch_size=8)
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), max_epochs=2,
                  device="cpu", callbacks=[TensorBoardCallback("runs/tiny", every_n_steps=1),
                                           ImageGridCallback("runs/tiny", num_images=4), ProgressBar(every_n_steps=1)])
trainer.fit(loader, loader)
"""
SHOW = 'import trainer.board\nserver = trainer.board.show("runs/tiny")\nprint(server.pid, server.port)'
AGAIN = 'server = trainer.board.show("runs/tiny")\nprint(server.pid, server.port)\nserver'  # the last line: a value


def outputs(cell, kind: str) -> list:
    return [output for output in cell.outputs if output.output_type == kind]


def printed(cell) -> str:
    return "".join(output.text for output in outputs(cell, "stream") if output.name == "stdout")


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A temporary folder for this test, the kernel it starts (whose environment is this checkout's)
    and the servers they start; a server still running at the end is stopped."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(os, "environ", checkout_env(TMPDIR=str(folder)))
    monkeypatch.setattr("tempfile.tempdir", str(folder))
    yield folder
    board.stop_all()


def test_show_in_a_jupyter_kernel_reuses_one_server_which_outlives_the_kernel(tmp_path, registry, capsys):
    """In a kernel, the progress bar is text (no ipywidgets here), and `show` run twice starts one
    server (same pid, same port) that serves the run. The kernel killed as a restart kills it, the
    server still answers and the next `show` (here from this process) finds it. `stop_all` stops it
    (SIGTERM), and it removes its registry entry and folder of links. The saved notebook, reopened
    where no server runs, shows a picture of the run and the command that serves it."""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code) for code in (TRAIN, SHOW, AGAIN)])
    # "immediate": leaving the block shuts the kernel down as a restart does, not by asking it to exit.
    client = nbclient.NotebookClient(
        notebook,
        timeout=180,
        kernel_name="python3",
        shutdown_kernel="immediate",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    with client.setup_kernel():
        kernel = client.km.provisioner.pid
        for index, cell in enumerate(notebook.cells):
            client.execute_cell(cell, index)
    with pytest.raises(ProcessLookupError):  # the kernel is gone
        os.kill(kernel, 0)
    train, show, again = notebook.cells
    assert "IProgress not found" not in json.dumps(train.outputs)  # a text bar: no ipywidgets here
    assert "epoch 2/2" in "".join(o.text for o in outputs(train, "stream"))
    assert printed(show) == printed(again)  # one server: same pid, same port
    assert outputs(again, "execute_result") == []  # no record of the server under the cell, to go stale
    pid, port = map(int, printed(show).split())

    [server] = board_servers.running()  # it outlived the kernel
    assert (server.pid, server.port) == (pid, port)
    assert urllib.request.urlopen(f"{server.url}data/runs", timeout=10).read() == b'["tiny"]'
    assert board.show(tmp_path / "runs" / "tiny") == server
    assert capsys.readouterr().out == f"TensorBoard on {server.path}: {server.url}\n"
    assert board.stop_all() == 1
    assert list(registry.glob("trainer-board-*")) == []  # no folder of links, and the empty registry removed
    assert board_servers.running() == []
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url, timeout=5).read()

    path = tmp_path / "board.ipynb"
    nbformat.write(notebook, path)  # a saved notebook, reopened where no server runs
    [display] = outputs(nbformat.read(path, as_version=4).cells[1], "display_data")
    page = display.data["text/html"]
    static = page[: page.index("<script>")]  # what shows where scripts do not run (GitHub, nbviewer)
    assert "To open TensorBoard live, run <code>trainer.board.show(" in static
    assert "python -m trainer.board runs/tiny" in static and str(tmp_path) not in json.dumps(display.data)
    assert set(display.data) == {"text/html", "text/plain"}  # the picture once, in the HTML
    encoded = re.search(r'src="data:image/png;base64,([^"]+)"', static)
    assert encoded and base64.b64decode(encoded.group(1)).startswith(b"\x89PNG")
    assert "<iframe" not in static


@pytest.mark.parametrize(
    ("kernel", "widgets", "bar"),
    [(True, True, "notebook"), (True, False, "std"), (False, True, "std"), (False, False, "std")],
)
def test_progress_bar_is_a_widget_only_in_a_kernel_with_ipywidgets(mocker, kernel, widgets, bar):
    """tqdm's notebook bar only in a kernel where ipywidgets is installed; the text bar elsewhere."""
    from trainer.callbacks import progress

    mocker.patch.object(progress, "in_notebook", return_value=kernel)
    mocker.patch.object(progress, "has_widgets", return_value=widgets)
    assert progress.bar_class().__module__ == f"tqdm.{bar}"
