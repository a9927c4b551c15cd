"""`trainer.board_frontends`: the address of a TensorBoard server for each notebook frontend
(environment variables mocked), and the cell output that `trainer.board.show` displays."""

from __future__ import annotations

import base64
import os

import pytest

from trainer.board_frontends import Frontend, cell_output, frontend
from trainer.board_servers import BoardServer

PORT = 6123
CLEAN = {"PATH": "/usr/bin"}  # none of the variables the rules read


@pytest.fixture
def environ(mocker):
    """A clean environment; tests add the variables of the frontend they play."""
    mocker.patch.dict(os.environ, CLEAN, clear=True)
    return os.environ


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({}, Frontend("jupyter", None)),  # same machine, or any Jupyter: resolved in the page
        ({"JUPYTERHUB_SERVICE_PREFIX": "/user/ada/"}, Frontend("jupyterhub", f"/user/ada/proxy/{PORT}/")),
        ({"JUPYTERHUB_SERVICE_PREFIX": "/user/ada"}, Frontend("jupyterhub", f"/user/ada/proxy/{PORT}/")),
        (
            {"TENSORBOARD_PROXY_URL": "https://vm.example.org/ports/%PORT%/"},
            Frontend("TENSORBOARD_PROXY_URL", f"https://vm.example.org/ports/{PORT}/"),
        ),
        (
            {"TENSORBOARD_PROXY_URL": "/proxy/%PORT%/", "JUPYTERHUB_SERVICE_PREFIX": "/user/ada/"},
            Frontend("TENSORBOARD_PROXY_URL", f"/proxy/{PORT}/"),
        ),  # the explicit setting wins
        ({"COLAB_RELEASE_TAG": "release-colab_20261201"}, Frontend("colab", None)),
        ({"VSCODE_PID": "4242"}, Frontend("vscode", f"http://localhost:{PORT}/")),
        ({"VSCODE_IPC_HOOK_CLI": "/run/user/1000/vscode-ipc.sock"}, Frontend("vscode", f"http://localhost:{PORT}/")),
    ],
)
def test_each_frontend_gets_its_address(environ, variables, expected):
    environ.update(variables)
    assert frontend(PORT) == expected


def test_colab_is_recognised_by_its_module(environ, mocker):
    mocker.patch.dict("sys.modules", {"google.colab": object()})
    assert frontend(PORT) == Frontend("colab", None)


def test_an_explicit_proxy_url_wins_over_everything(environ):
    environ.update(TENSORBOARD_PROXY_URL="/other/%PORT%/", JUPYTERHUB_SERVICE_PREFIX="/user/ada/", VSCODE_PID="1")
    assert frontend(PORT, proxy_url="https://lab.example.org/tb/%PORT%/") == Frontend(
        "proxy_url", f"https://lab.example.org/tb/{PORT}/"
    )


@pytest.mark.parametrize("source", ["argument", "environment"])
def test_a_proxy_url_without_the_port_placeholder_is_a_clear_error(environ, source):
    if source == "argument":
        with pytest.raises(ValueError, match=r"proxy_url must hold %PORT%.*'https://lab/tb/'"):
            frontend(PORT, proxy_url="https://lab/tb/")
    else:
        environ["TENSORBOARD_PROXY_URL"] = "https://lab/tb/"
        with pytest.raises(ValueError, match=r"TENSORBOARD_PROXY_URL must hold %PORT%"):
            frontend(PORT)


SERVER = BoardServer(path="/home/ada/runs/tiny", pid=1, port=PORT, host="127.0.0.1", url=f"http://127.0.0.1:{PORT}/")


def test_the_cell_holds_the_picture_and_what_to_run_before_any_script_runs():
    encoded = base64.b64encode(b"\x89PNG fake").decode()
    out = cell_output(SERVER, Frontend("jupyter", None), 640, b"\x89PNG fake")
    page = out["text/html"]
    note = page[: page.index("<script>")]  # what a renderer without scripts (GitHub, nbviewer) shows
    assert "trainer.board.show(&#x27;/home/ada/runs/tiny&#x27;)" in note
    assert "python -m trainer.board /home/ada/runs/tiny" in note
    assert f'src="data:image/png;base64,{encoded}"' in note
    assert "<iframe" not in page  # the frame is made by the script, only once the server answers
    assert out["image/png"] == encoded
    assert out["text/plain"] == f"TensorBoard on /home/ada/runs/tiny: http://127.0.0.1:{PORT}/"


def test_the_page_resolves_the_jupyter_address_from_its_own_location_and_base_url():
    page = cell_output(SERVER, Frontend("jupyter", None), 640, None)["text/html"]
    assert '"localhost", "127.0.0.1", "[::1]"' in page and f'return "http://127.0.0.1:{PORT}/"' in page
    assert "jupyter-config-data" in page and f'"proxy/{PORT}/"' in page
    assert 'frame.height = "640"' in page
    assert "No picture of the run was made" in page and "<img" not in page


@pytest.mark.parametrize(
    "target", [Frontend("jupyterhub", f"/user/ada/proxy/{PORT}/"), Frontend("vscode", f"http://localhost:{PORT}/")]
)
def test_a_known_address_is_used_as_it_is(target):
    out = cell_output(SERVER, target, 800, None)
    assert f"return new URL({target.url!r}".replace("'", '"') in out["text/html"]
    assert out["text/plain"] == f"TensorBoard on /home/ada/runs/tiny: {target.url}"


def test_colab_asks_colab_for_the_address():
    page = cell_output(SERVER, Frontend("colab", None), 800, None)["text/html"]
    assert f"google.colab.kernel.proxyPort({PORT}" in page
