"""`trainer.board.frontends` and `trainer.board.cell`: the address of a TensorBoard server for each notebook frontend
(environment variables mocked), and the cell output that `trainer.board.show` displays."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shlex
from html.parser import HTMLParser

import pytest
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard.writer import FileWriter

from trainer.board.cell import cell_output
from trainer.board.frontends import Frontend, frontend
from trainer.board.servers import BoardServer
from trainer.board.snapshot import snapshot, snapshot_png

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


def test_the_cell_holds_the_picture_once_and_what_to_run_before_any_script_runs():
    """The picture is embedded once (in the HTML); the note and the commands name the folder as the
    user gave it, not its resolved path."""
    encoded = base64.b64encode(b"\x89PNG fake").decode()
    out = cell_output(SERVER, Frontend("jupyter", None), 640, b"\x89PNG fake", shown="runs/tiny")
    page = out["text/html"]
    note = page[: page.index("<script>")]  # what a renderer without scripts (GitHub, nbviewer) shows
    assert "trainer.board.show(&#x27;runs/tiny&#x27;)" in note
    assert "python -m trainer.board runs/tiny" in note
    assert f'src="data:image/png;base64,{encoded}"' in note
    assert "<iframe" not in page  # the frame is made by the script, only once the server answers
    assert set(out) == {"text/html", "text/plain"} and json.dumps(out).count(encoded) == 1
    assert "/home/ada" not in json.dumps(out).replace(f"{SERVER.url}", "")
    assert out["text/plain"] == f"TensorBoard on runs/tiny: http://127.0.0.1:{PORT}/"


def test_the_page_resolves_the_jupyter_address_from_its_own_location_and_base_url():
    page = cell_output(SERVER, Frontend("jupyter", None), 640, None)["text/html"]
    assert '"localhost", "127.0.0.1", "[::1]"' in page and f'local ? ["http://127.0.0.1:{PORT}/", proxied]' in page
    assert "jupyter-config-data" in page and f'"proxy/{PORT}/"' in page
    assert 'frame.height = "640"' in page
    assert "No picture of the run was made" in page and "<img" not in page


@pytest.mark.parametrize(
    "target", [Frontend("jupyterhub", f"/user/ada/proxy/{PORT}/"), Frontend("vscode", f"http://localhost:{PORT}/")]
)
def test_a_known_address_is_used_as_it_is(target):
    out = cell_output(SERVER, target, 800, None)
    assert f"return [new URL({target.url!r}".replace("'", '"') in out["text/html"]
    assert out["text/plain"] == f"TensorBoard on /home/ada/runs/tiny: {target.url}"


def test_colab_asks_colab_for_the_address():
    page = cell_output(SERVER, Frontend("colab", None), 800, None)["text/html"]
    assert f"google.colab.kernel.proxyPort({PORT}" in page


# ------------------------------------------------------------------- what comes from outside
HOSTILE_PATH = "/home/ada/runs/a'b\"c & d/</script><script>alert(1)</script><!--x\u2028"


class Page(HTMLParser):
    """The elements, texts and script bodies of a cell's HTML, as a browser's parser splits them."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.scripts: list[str] = []
        self.text = ""
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        if self.lasttag == "script" and self.tags.count("script") > len(self.scripts):
            self.scripts.append(data)
        else:
            self.text += data


@pytest.mark.parametrize(
    "target",
    [Frontend("jupyter", None), Frontend("jupyterhub", "/user/</script><script>alert(2)</script>/proxy/6123/")],
)
def test_a_hostile_folder_name_is_text_in_the_cell_and_never_ends_its_script(target):
    """A folder named with ``</script>``, ``<!--``, quotes, ``&`` and U+2028 (and an address holding
    ``</script>``): the cell has one script, which the name cannot end; the note shows the name as
    text, and the script holds it as a string literal that reads back as the name."""
    server = BoardServer(HOSTILE_PATH, 1, PORT, "127.0.0.1", f"http://127.0.0.1:{PORT}/")
    page = cell_output(server, target, 640, b"\x89PNG fake")["text/html"]
    parsed = Page(page)
    assert parsed.tags.count("script") == 1 and len(parsed.scripts) == 1
    assert page.lower().count("</script") == 1 and "<!--" not in page
    assert "\u2028" not in parsed.scripts[0]  # a line break to older JavaScript, inside a string
    assert parsed.tags == ["div", "p", "code", "code", "code", "img", "script"]  # nothing the name added
    assert f"({HOSTILE_PATH})" in parsed.text  # the note, as text
    assert f"trainer.board.show({HOSTILE_PATH!r})" in parsed.text
    assert f"python -m trainer.board {shlex.quote(HOSTILE_PATH)}" in parsed.text
    literal = re.search(r'note.innerHTML = (".*?")\.replace', parsed.scripts[0])
    assert literal and html.escape(HOSTILE_PATH, quote=True) in json.loads(literal.group(1))
    if target.url:
        literal = re.search(r"return \[new URL\((\".*?\"), window.location\)", parsed.scripts[0])
        assert literal and json.loads(literal.group(1)) == target.url


@pytest.mark.parametrize("port", ["6123 onerror=alert(1)", "6123", 6123.0, True, 0, 70000])
def test_a_port_that_is_not_an_int_in_range_is_refused(port):
    """The port goes into the page as a number: anything but an int from 1 to 65535 is refused."""
    server = BoardServer("/home/ada/runs/tiny", 1, port, "127.0.0.1", f"http://127.0.0.1:{PORT}/")
    with pytest.raises(ValueError, match="a port must be an integer from 1 to 65535"):
        cell_output(server, Frontend("colab", None), 800, None)
    if port != 0:  # 0 only checks a proxy address before a server runs
        with pytest.raises(ValueError, match="a port must be an integer"):
            frontend(port)


# ------------------------------------------------------------------- snapshot
def test_the_picture_draws_names_as_text_and_leaves_out_an_image_that_does_not_decode(tmp_path):
    """A run whose folder and tag names hold ``$`` (which would start a matplotlib formula, and fail
    to draw) and whose latest image is not an image: the picture is drawn, with the curves alone."""
    run = tmp_path / r"run $\frac{$"
    writer = FileWriter(str(run))
    for step in (1, 2):
        writer.add_summary(Summary(value=[Summary.Value(tag=r"Loss/a $\frac{$", simple_value=1.0 / step)]), step)
    broken = Summary.Image(encoded_image_string=b"not an image", height=8, width=8, colorspace=3)
    writer.add_summary(Summary(value=[Summary.Value(tag="predictions vs. actuals", image=broken)]), 2)
    writer.close()
    for root in (run, tmp_path):  # a run directory, and a folder of runs (its name in the legend)
        picture = snapshot_png(root)
        assert picture is not None and picture.startswith(b"\x89PNG")
        assert Image.open(io.BytesIO(picture)).size == (930, 340)  # the curves alone: no figure drawn


def png_image(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_picture_is_drawn_once_per_state_of_the_event_files(tmp_path):
    """A second `snapshot` of an unchanged folder is the same picture, not drawn again; once a run's
    event files change (a new point, a new run), the next one is drawn from what they now hold."""
    runs = tmp_path / "runs"
    writer = FileWriter(str(runs / "a"))
    writer.add_summary(Summary(value=[Summary.Value(tag="Loss/training loss", simple_value=1.0)]), 1)
    writer.flush()
    first = snapshot(runs)
    assert snapshot(runs) is first and first.points == 1
    writer.add_summary(Summary(value=[Summary.Value(tag="Loss/training loss", simple_value=0.5)]), 2)
    writer.close()
    second = snapshot(runs)
    assert second is not first and second.points == 2 and second.png != first.png
    other = FileWriter(str(runs / "b"))
    other.add_summary(Summary(value=[Summary.Value(tag="Loss/validation", simple_value=0.7)]), 1)
    other.close()
    assert snapshot(runs) is not second


def test_the_latest_figure_is_drawn_below_the_curves_at_the_pictures_full_width(tmp_path):
    """The newest run's latest figure goes below the curves, as wide as the picture (930 pixels:
    a notebook's width), so its text shows at about its own size; its height follows its shape."""
    writer = FileWriter(str(tmp_path))
    writer.add_summary(Summary(value=[Summary.Value(tag="Loss/training loss", simple_value=1.0)]), 1)
    figure = Summary.Image(encoded_image_string=png_image(900, 600), height=600, width=900, colorspace=3)
    writer.add_summary(Summary(value=[Summary.Value(tag="predictions vs. actuals", image=figure)]), 1)
    writer.close()
    width, height = Image.open(io.BytesIO(snapshot_png(tmp_path))).size
    assert width == 930 and height == 340 + round(930 * 600 / 900) + 40


def test_the_picture_drops_the_points_a_resumed_run_replaced_as_tensorboard_does(tmp_path):
    """A run killed after step 4 and resumed from its step-2 checkpoint writes a restart marker at
    step 3, then steps 3 and 4 again: the picture reads the event file as TensorBoard's reader does,
    dropping the killed process's steps 3 and 4 (4 points, not 6), and skips a last record cut short."""
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    writer = FileWriter(str(tmp_path))
    start = SessionLog(status=SessionLog.START)
    writer.add_event(Event(step=0, session_log=start))
    for step in (1, 2, 3, 4):
        writer.add_summary(Summary(value=[Summary.Value(tag="Loss/training loss", simple_value=1.0 / step)]), step)
    writer.add_event(Event(step=3, session_log=start))
    for step in (3, 4):
        writer.add_summary(Summary(value=[Summary.Value(tag="Loss/training loss", simple_value=0.1)]), step)
    writer.close()
    [file] = tmp_path.glob("events.out.tfevents.*")
    with file.open("ab") as stream:
        stream.write(b"\x40\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00partial")  # a record being written
    assert snapshot(tmp_path).points == 4
