"""Whether this code runs in a Jupyter kernel, and what its notebook frontend can show."""

from __future__ import annotations

import importlib.util
import sys


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (JupyterLab, Notebook, VS Code, Colab...), where
    `IPython.display.display` shows rich output in a cell; False in scripts and terminal IPython."""
    ipython = sys.modules.get("IPython")  # a kernel has imported it; a script need not import it here
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def has_widgets() -> bool:
    """Whether ipywidgets is installed, so that tqdm can draw its notebook bar."""
    return importlib.util.find_spec("ipywidgets") is not None
