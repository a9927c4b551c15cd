"""Where a notebook's browser reaches a TensorBoard server, per frontend, and what the cell shows.

The kernel and the browser often sit on different machines (JupyterHub, a cloud VM, VS Code
Remote, Colab), and the browser may reach only the notebook server's own port. `frontend` picks
the address by these rules, first match wins:

1. ``proxy_url=`` given to `trainer.board.show`: that address, ``%PORT%`` replaced by the port.
2. ``TENSORBOARD_PROXY_URL`` set (as TensorBoard's own ``%tensorboard`` reads it): the same.
3. Colab (``google.colab`` imported, or ``COLAB_RELEASE_TAG`` set): Colab's own port serving,
   ``google.colab.kernel.proxyPort(PORT)``, resolved in the page.
4. JupyterHub (``JUPYTERHUB_SERVICE_PREFIX`` set, e.g. ``/user/ada/``): its jupyter-server-proxy
   address ``/user/ada/proxy/PORT/``.
5. VS Code (``VSCODE_PID``, ``VSCODE_IPC_HOOK_CLI`` or ``VSCODE_CWD`` set): ``http://localhost:PORT/``,
   which VS Code's notebook view maps to the kernel's machine, forwarding the port if remote.
6. Any other Jupyter: resolved in the page. A page served from this machine (``localhost``,
   ``127.0.0.1``, ``[::1]``) opens the server directly; any other uses jupyter-server-proxy on
   the notebook server, ``<base_url>proxy/PORT/``, with the server's base URL read from the page.

The cell holds a picture of the run and a note saying how to open TensorBoard live. A script in
the cell asks the server whether it answers (at once, then every few seconds): while it does, the
live TensorBoard replaces the picture; when it does not, the picture stays and the note says what
to run. Where scripts do not run (a notebook opened untrusted, GitHub, nbviewer), the picture and
the note are what shows: never an empty frame.

Everything the cell takes from outside (the folder's path, the addresses, the port) is written for
its place: HTML text and attributes through `html.escape`, values in the script as JSON that cannot
end the script (`script_json`), numbers as integers (`port_number`). A folder named
``</script><script>...`` shows as its name and runs nothing.
"""

from __future__ import annotations

import base64
import html
import json
import os
import secrets
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The placeholder for the port in ``proxy_url`` and ``TENSORBOARD_PROXY_URL``.
PORT_PLACEHOLDER = "%PORT%"
#: How often the cell's script asks the server whether it still answers, in milliseconds.
RECHECK_MS = 5000
_VSCODE_VARIABLES = ("VSCODE_PID", "VSCODE_IPC_HOOK_CLI", "VSCODE_CWD")


@dataclass(frozen=True)
class Frontend:
    """Where the browser reaches the server.

    Attributes:
        name: the rule that matched: ``proxy_url``, ``TENSORBOARD_PROXY_URL``, ``colab``,
            ``jupyterhub``, ``vscode`` or ``jupyter``.
        url: the address, or None where the page resolves it (``colab``, ``jupyter``).
    """

    name: str
    url: str | None


def port_number(port: Any, allow_zero: bool = False) -> int:
    """`port` as an int, if it is one from 1 (or 0 with `allow_zero`) to 65535; else a ValueError."""
    if isinstance(port, bool) or not isinstance(port, int) or not (0 if allow_zero else 1) <= port <= 0xFFFF:
        raise ValueError(f"a port must be an integer from 1 to 65535, got {port!r}")
    return port


def script_json(value: Any) -> str:
    """`value` as JSON that is safe inside an HTML ``<script>``: ``<``, ``>`` and ``&`` (which could
    end the script with ``</script>`` or open ``<!--``) and the line separators U+2028 and U+2029 are
    written as ``\\u`` escapes, which JavaScript reads back as the same characters."""
    text = json.dumps(value)
    for character in "<>&\u2028\u2029":
        text = text.replace(character, f"\\u{ord(character):04x}")
    return text


def check_proxy_url(proxy_url: str, source: str = "proxy_url") -> str:
    """`proxy_url` if it holds ``%PORT%``; else a ValueError naming `source`."""
    if not isinstance(proxy_url, str) or PORT_PLACEHOLDER not in proxy_url:
        raise ValueError(
            f"{source} must hold {PORT_PLACEHOLDER} where the server's port goes "
            f"(e.g. 'https://example.org/proxy/{PORT_PLACEHOLDER}/'), got {proxy_url!r}"
        )
    return proxy_url


def frontend(
    port: int,
    proxy_url: str | None = None,
    environ: Mapping[str, str] | None = None,
    modules: Mapping[str, Any] | None = None,
) -> Frontend:
    """The address of the server on `port` for the notebook frontend, by the module's rules.

    Args:
        port: the server's port (0 to check `proxy_url` before a server runs).
        proxy_url: an explicit address with ``%PORT%`` (rule 1).
        environ: the environment variables (default: ``os.environ``).
        modules: the imported modules (default: ``sys.modules``), to recognise Colab.

    Raises:
        ValueError: `proxy_url` or ``TENSORBOARD_PROXY_URL`` has no ``%PORT%``, or `port` is not a port.
    """
    port = port_number(port, allow_zero=True)
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    if proxy_url is not None:
        return Frontend("proxy_url", check_proxy_url(proxy_url).replace(PORT_PLACEHOLDER, str(port)))
    if environ.get("TENSORBOARD_PROXY_URL"):
        template = check_proxy_url(environ["TENSORBOARD_PROXY_URL"], "TENSORBOARD_PROXY_URL")
        return Frontend("TENSORBOARD_PROXY_URL", template.replace(PORT_PLACEHOLDER, str(port)))
    if "google.colab" in modules or environ.get("COLAB_RELEASE_TAG"):
        return Frontend("colab", None)
    if environ.get("JUPYTERHUB_SERVICE_PREFIX"):
        prefix = environ["JUPYTERHUB_SERVICE_PREFIX"].rstrip("/")
        return Frontend("jupyterhub", f"{prefix}/proxy/{port}/")
    if any(environ.get(name) for name in _VSCODE_VARIABLES):
        return Frontend("vscode", f"http://localhost:{port}/")
    return Frontend("jupyter", None)


def _resolver(server: Any, target: Frontend) -> str:
    """The body of the page's ``async function address()``: the server's address in the browser."""
    port = port_number(server.port)
    if target.url is not None:
        return f"return new URL({script_json(target.url)}, window.location).href;"
    if target.name == "colab":
        return f"return new URL(await google.colab.kernel.proxyPort({port}, {{cache: false}})).href;"
    direct = server.url if server.host not in ("", "0.0.0.0", "::") else f"http://127.0.0.1:{port}/"
    return f"""if (["localhost", "127.0.0.1", "[::1]"].includes(window.location.hostname)) {{
      return {script_json(direct)};
    }}
    let base = document.body.dataset.baseUrl || "/";
    const config = document.getElementById("jupyter-config-data");
    if (config) {{
      try {{ base = JSON.parse(config.textContent).baseUrl || base; }} catch (error) {{}}
    }}
    return new URL(base.replace(/\\/?$/, "/") + "proxy/{port}/", window.location).href;"""


def restart_hint(path: str) -> str:
    """What to run to see the run live again (HTML): the path as a Python literal and, quoted for
    the shell, in a command line, both escaped for HTML."""
    literal = html.escape(repr(os.fspath(path)), quote=True)
    command = html.escape(shlex.quote(os.fspath(path)), quote=True)
    return (
        f"run <code>trainer.board.show({literal})</code> in a running notebook, or "
        f"<code>python -m trainer.board {command}</code> in a shell"
    )


def cell_output(server: Any, target: Frontend, height: int, picture: bytes | None) -> dict[str, str]:
    """The cell's output bundle (MIME type -> data) for `server` seen through `target`.

    Args:
        server: the `trainer.board_servers.BoardServer`.
        target: where the browser reaches it (`frontend`).
        height: the height of the live frame, in pixels.
        picture: a PNG of the run (`trainer.board_snapshot.snapshot_png`), or None.

    Raises:
        ValueError: the server's port is not an int from 1 to 65535.
    """
    port_number(server.port)
    box = f"trainer-board-{secrets.token_hex(6)}"
    hint = restart_hint(server.path)
    what = "A picture of the run when this cell ran" if picture else "No picture of the run was made"
    note = f"{what} ({html.escape(server.path, quote=True)}). To open TensorBoard live, {hint}."
    gone = (
        f"TensorBoard does not answer at <code>%URL%</code>. If its server stopped (kernel or "
        f"machine restarted, <code>trainer.board.stop</code>), {hint}. If this browser cannot "
        f"reach the notebook's machine, install jupyter-server-proxy there, or set "
        f"<code>TENSORBOARD_PROXY_URL</code> or <code>proxy_url=</code>."
    )
    image = ""
    bundle = {"text/plain": f"TensorBoard on {server.path}: {target.url or server.url}"}
    if picture:
        encoded = base64.b64encode(picture).decode()
        image = (
            f'<img class="trainer-board-picture" style="max-width:100%" '
            f'alt="loss curves and latest figure of the run" src="data:image/png;base64,{encoded}">'
        )
        bundle["image/png"] = encoded
    bundle["text/html"] = f"""<div id="{box}">
<p class="trainer-board-note">{note}</p>
{image}
<script>
(function () {{
  const box = document.getElementById({script_json(box)});
  if (!box) return;
  const note = box.querySelector(".trainer-board-note");
  const picture = box.querySelector(".trainer-board-picture");
  let frame = null;
  const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";");
  async function address() {{
    {_resolver(server, target)}
  }}
  async function answers(url) {{
    try {{
      const probe = new URL("data/environment", url);
      if (probe.origin === window.location.origin) {{
        return (await fetch(probe, {{cache: "no-store"}})).ok;
      }}
      await fetch(probe, {{mode: "no-cors", cache: "no-store"}});  // resolves whenever the server answers
      return true;
    }} catch (error) {{
      return false;
    }}
  }}
  async function check() {{
    let url = null;
    try {{ url = await address(); }} catch (error) {{}}
    if (url && await answers(url)) {{
      if (!frame) {{
        frame = document.createElement("iframe");
        frame.src = url;
        frame.width = "100%";
        frame.height = "{int(height)}";
        frame.style.border = "0";
        box.appendChild(frame);
        note.textContent = "TensorBoard on " + {script_json(server.path)} + ": " + url;
        if (picture) picture.style.display = "none";
      }}
      return;
    }}
    if (frame) {{ frame.remove(); frame = null; }}
    note.innerHTML = {script_json(gone)}.replace("%URL%", () => escapeHtml(url || "(no address)"));
    if (picture) picture.style.display = "";
  }}
  check();
  const timer = setInterval(() => {{ document.body.contains(box) ? check() : clearInterval(timer); }}, {RECHECK_MS});
}})();
</script>
</div>"""
    return bundle
