"""Where a notebook's browser reaches a TensorBoard server, per frontend.

The kernel and the browser often sit on different machines (JupyterHub, a cloud VM, an SSH tunnel,
VS Code Remote, Colab), and the browser may reach only the notebook server's own port. `frontend`
picks the address by these rules, first match wins:

1. ``proxy_url=`` given to `trainer.board.show`: that address, ``%PORT%`` replaced by the port.
2. ``TENSORBOARD_PROXY_URL`` set (as TensorBoard's own ``%tensorboard`` reads it): the same.
3. Colab (``google.colab`` imported, or ``COLAB_RELEASE_TAG`` set): Colab's own port serving,
   ``google.colab.kernel.proxyPort(PORT)``, resolved in the page.
4. JupyterHub (``JUPYTERHUB_SERVICE_PREFIX`` set, e.g. ``/user/ada/``): its jupyter-server-proxy
   address ``/user/ada/proxy/PORT/``.
5. VS Code (``VSCODE_PID``, ``VSCODE_IPC_HOOK_CLI`` or ``VSCODE_CWD`` set): ``http://localhost:PORT/``,
   which VS Code's notebook view maps to the kernel's machine, forwarding the port if remote.
6. Any other Jupyter: resolved in the page (`trainer.board.cell`). A page served from
   ``localhost``, ``127.0.0.1`` or ``[::1]`` tries the server directly first, then, when that does
   not answer as this folder's server (the page came through an SSH tunnel or another port
   forward), jupyter-server-proxy on the notebook server, ``<base_url>proxy/PORT/``, which is
   what any other page uses; the server's base URL is read from the page.

Everything the cell takes from outside is written for its place: values in the script as JSON that
cannot end the script (`script_json`), numbers as integers (`port_number`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The placeholder for the port in ``proxy_url`` and ``TENSORBOARD_PROXY_URL``.
PORT_PLACEHOLDER = "%PORT%"
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
