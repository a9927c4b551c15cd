"""What a notebook cell of `trainer.board.show` holds: a picture of the run, a note, and a script
that puts the live TensorBoard in its place where the browser reaches it.

The picture (a PNG, embedded once, in the HTML) and the note saying how to open TensorBoard live
are what every viewer shows: a notebook opened untrusted, GitHub, nbviewer, an nbconvert export.
The script probes only on a live notebook page (JupyterLab or Notebook, whose page carries its
configuration; Colab; VS Code's notebook view); on any other page that runs scripts (nbviewer) the
picture and the note stay as they are.

On a live page the script asks each address of the server (`trainer.board.frontends`) for
``trainer-board.json`` (at once, then every few seconds) and takes the first that answers as the
server of this cell's folder (`trainer.board.server.folder_id`): a proxy's error page or another
service on that port is never taken for the board. While one answers, the live TensorBoard
replaces the picture, with a link that opens it in a new tab; when none does, the picture comes
back and the note says what to run and how to give the address (``proxy_url=``).

Everything the cell takes from outside (the folder's path, the addresses, the port) is written for
its place: HTML text and attributes through `html.escape`, values in the script as JSON that cannot
end the script (`trainer.board.frontends.script_json`), numbers as integers. A folder named
``</script><script>...`` shows as its name and runs nothing.
"""

from __future__ import annotations

import base64
import html
import os
import re
import secrets
import shlex
from typing import Any

from trainer.board.frontends import Frontend, port_number, script_json
from trainer.board.server import IDENTITY_ROUTE, folder_id

#: How often the cell's script asks the server whether it still answers, in milliseconds.
RECHECK_MS = 5000
#: The longest loss curve (in points) that the live board shows unsmoothed, so that a short run's
#: curves end on the values logged; longer ones keep TensorBoard's own smoothing.
UNSMOOTHED_POINTS = 200

_SCRIPT = """(function () {
  const box = document.getElementById(%BOX%);
  if (!box) return;
  const note = box.querySelector(".trainer-board-note");
  const picture = box.querySelector(".trainer-board-picture");
  let frame = null, current = null;
  const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";");
  function jupyterBase() {
    const config = document.getElementById("jupyter-config-data");
    if (config) {
      try { return JSON.parse(config.textContent).baseUrl || "/"; } catch (error) { return "/"; }
    }
    return document.body.dataset.baseUrl || null;
  }
  const colab = typeof google !== "undefined" && google.colab;
  if (jupyterBase() === null && !colab && window.location.protocol !== "vscode-webview:") return;
  async function addresses() {
    %RESOLVER%
  }
  async function serves(url) {
    try {
      const answer = await fetch(new URL(%IDENTITY_ROUTE%, url), {cache: "no-store"});
      return answer.ok && (await answer.json()).folder === %FOLDER%;
    } catch (error) {
      return false;
    }
  }
  function showLive(url) {
    current = url;
    if (frame) return;
    const page = url + %VIEW%;
    frame = document.createElement("iframe");
    frame.src = page;
    frame.width = "100%";
    frame.height = "%HEIGHT%";
    frame.style.border = "0";
    box.appendChild(frame);
    note.innerHTML = %LIVE%.replace("%URL%", () => escapeHtml(page));
    if (picture) picture.style.display = "none";
  }
  async function check() {
    let urls = [];
    try { urls = await addresses(); } catch (error) {}
    for (const url of current ? [current, ...urls.filter((other) => other !== current)] : urls) {
      if (await serves(url)) return showLive(url);
    }
    current = null;
    if (frame) { frame.remove(); frame = null; }
    const tried = urls.map((url) => "<code>" + escapeHtml(url) + "</code>").join(" or ") || "(no address)";
    note.innerHTML = %GONE%.replace("%URL%", () => tried);
    if (picture) picture.style.display = "";
  }
  check();
  const timer = setInterval(() => { document.body.contains(box) ? check() : clearInterval(timer); }, %RECHECK%);
})();"""


def _resolver(server: Any, target: Frontend) -> str:
    """The body of the page's ``async function addresses()``: where the browser may reach the
    server, in the order to try."""
    port = port_number(server.port)
    if target.url is not None:
        return f"return [new URL({script_json(target.url)}, window.location).href];"
    if target.name == "colab":
        return f"return [new URL(await google.colab.kernel.proxyPort({port}, {{cache: false}})).href];"
    direct = server.url if server.host not in ("", "0.0.0.0", "::") else f"http://127.0.0.1:{port}/"
    return f"""const base = (jupyterBase() || "/").replace(/\\/?$/, "/");
    const proxied = new URL(base + "proxy/{port}/", window.location).href;
    const local = ["localhost", "127.0.0.1", "[::1]"].includes(window.location.hostname);
    return local ? [{script_json(direct)}, proxied] : [proxied];"""


def restart_hint(path: str | os.PathLike) -> str:
    """What to run to see the run live again (HTML): the path as a Python literal and, quoted for
    the shell, in a command line, both escaped for HTML."""
    literal = html.escape(repr(os.fspath(path)), quote=True)
    command = html.escape(shlex.quote(os.fspath(path)), quote=True)
    return (
        f"run <code>trainer.board.show({literal})</code> in a running notebook, or "
        f"<code>python -m trainer.board {command}</code> in a shell"
    )


def _messages(shown: str, port: int, picture: bool) -> dict[str, str]:
    """The note's texts (HTML): ``neutral`` where no probe runs, ``live`` while the board answers,
    ``gone`` when it does not (``%URL%``: the addresses tried)."""
    hint, name = restart_hint(shown), html.escape(shown, quote=True)
    what = "A picture of the run when this cell ran" if picture else "No picture of the run was made"
    return {
        "neutral": f"{what} (<code>{name}</code>). To open TensorBoard live, {hint}.",
        "live": f'TensorBoard on <code>{name}</code>, live: <a href="%URL%" target="_blank" '
        'rel="noopener">open in a new tab</a>',
        "gone": (
            f"TensorBoard on <code>{name}</code> does not answer at %URL%. If its server stopped (kernel or "
            f"machine restarted, <code>trainer.board.stop</code>), {hint}. If this browser cannot reach "
            f"the notebook's machine on port {port} (an SSH tunnel to Jupyter's port only), install "
            f"jupyter-server-proxy where Jupyter runs, or give the address this browser reaches the port at: "
            f"<code>trainer.board.show(..., proxy_url='http://.../%PORT%/')</code> or "
            f"<code>TENSORBOARD_PROXY_URL</code>."
        ),
    }


def cell_output(
    server: Any, target: Frontend, height: int, picture: bytes | None, shown: str | None = None, points: int = 0
) -> dict[str, str]:
    """The cell's output bundle (MIME type -> data) for `server` seen through `target`.

    Args:
        server: the `trainer.board.servers.BoardServer`.
        target: where the browser reaches it (`trainer.board.frontends.frontend`).
        height: the height of the live frame, in pixels.
        picture: a PNG of the run (`trainer.board.snapshot.snapshot`), or None.
        shown: the folder as the user gave it, for the note and the commands (default: its resolved path).
        points: the number of points of the run's longest loss curve (see `UNSMOOTHED_POINTS`).

    Raises:
        ValueError: the server's port is not an int from 1 to 65535.
    """
    port = port_number(server.port)
    shown = os.fspath(server.path if shown is None else shown)
    box, texts = f"trainer-board-{secrets.token_hex(6)}", _messages(shown, port, bool(picture))
    view = ("?smoothing=0" if points <= UNSMOOTHED_POINTS else "") + "#timeseries"
    replacements = {
        "%BOX%": script_json(box),
        "%RESOLVER%": _resolver(server, target),
        "%IDENTITY_ROUTE%": script_json(IDENTITY_ROUTE),
        "%FOLDER%": script_json(folder_id(server.path)),
        "%VIEW%": script_json(view),
        "%HEIGHT%": str(int(height)),
        "%LIVE%": script_json(texts["live"]),
        "%GONE%": script_json(texts["gone"]),
        "%RECHECK%": str(RECHECK_MS),
    }
    script = re.sub(r"%[A-Z_]+%", lambda match: replacements.get(match.group(), match.group()), _SCRIPT)
    image = ""
    if picture:
        source = f"data:image/png;base64,{base64.b64encode(picture).decode()}"
        image = (
            '<img class="trainer-board-picture" style="max-width:100%" '
            f'alt="loss curves and latest figure of the run" src="{source}">'
        )
    note = f'<p class="trainer-board-note">{texts["neutral"]}</p>'
    page = f'<div id="{box}">\n{note}\n{image}\n<script>\n{script}\n</script>\n</div>'
    return {"text/plain": f"TensorBoard on {shown}: {target.url or server.url}", "text/html": page}
