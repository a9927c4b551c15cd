"""Real processes of this checkout's code: `RecipeProcess`, a recipe's command line in a
subprocess, watched while it runs; and `checkout_env`, the environment of any subprocess that
runs this checkout's code.

The tests that need a real process (a kill, a signal to the process group, two runs at once, a
full disk) and the reliability benchmark (`bench/reliability.py`) start ``python -m
recipes.nested_unet`` with `RecipeProcess`, wait for a moment they can see (its progress bar on
stderr, a file in its run directory), then stop it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
POLL = 0.002  # seconds between two looks at a condition


def checkout_env(**extra: str) -> dict[str, str]:
    """This process's environment, with this checkout's import packages (the repository root and
    ``datasets/``, which holds `trainer_datasets`) first on ``PYTHONPATH``, installed or not, and
    the variables in `extra`."""
    paths = [str(ROOT), str(ROOT / "datasets"), os.environ.get("PYTHONPATH")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)), **extra)


class RecipeProcess:
    """``python -m recipes.nested_unet ARGS`` (or ``python -c CODE ARGS``, or ``python SCRIPT
    ARGS``) in the repository root, its stdout and stderr collected while it runs.

    Args:
        args: the command-line arguments.
        code: run this Python code with the arguments instead of the recipe module.
        script: run this Python file (a recipe outside the package) with the arguments instead.
        timeout: upper bound in seconds of every wait.
        new_session: start it in a session (and process group) of its own, as a terminal or a
            job scheduler does, so that `signal_group` reaches it and its DataLoader workers alone.
    """

    def __init__(
        self,
        args: Sequence[str],
        code: str | None = None,
        timeout: float = 300.0,
        new_session: bool = False,
        script: str | os.PathLike | None = None,
    ) -> None:
        command = (
            [sys.executable, "-c", code]
            if code is not None
            else [sys.executable, os.fspath(script)]
            if script is not None
            else [sys.executable, "-m", "recipes.nested_unet"]
        )
        self.timeout = timeout
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [*command, *args],
            cwd=ROOT,
            env=checkout_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=new_session,
        )
        self._chunks: dict[str, list[bytes]] = {"out": [], "err": []}
        self._readers = [
            threading.Thread(target=self._read, args=(stream, key), daemon=True)
            for stream, key in ((self.process.stdout, "out"), (self.process.stderr, "err"))
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any, key: str) -> None:
        for chunk in iter(lambda: stream.read1(65536), b""):
            self._chunks[key].append(chunk)

    @property
    def stdout(self) -> str:
        """Everything the process printed on stdout so far."""
        return b"".join(self._chunks["out"]).decode(errors="replace")

    @property
    def stderr(self) -> str:
        """Everything the process printed on stderr so far (the progress bar, messages)."""
        return b"".join(self._chunks["err"]).decode(errors="replace")

    def elapsed(self) -> float:
        """Seconds since the process started."""
        return time.monotonic() - self.started

    def poll_until(self, condition: Callable[[], bool]) -> bool:
        """Look at `condition` until it holds (True), or until the process has exited without it
        or the timeout passed (False)."""
        deadline = time.monotonic() + self.timeout
        while not condition():
            if (self.process.poll() is not None and not condition()) or time.monotonic() > deadline:
                return False
            time.sleep(POLL)
        return True

    def stop(self, signum: int = signal.SIGKILL) -> int:
        """Send `signum` (if the process still runs) and return its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.finish()

    def signal_group(self, signum: int) -> int:
        """Send `signum` to the process's whole group, as Ctrl-C in a terminal or Slurm does (the
        process must have been started with ``new_session=True``), and return its exit code."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signum)
        return self.finish()

    def finish(self) -> int:
        """Wait for the process to end (killing it after the timeout); return its exit code."""
        try:
            returncode = self.process.wait(self.timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            returncode = self.process.wait()
        for reader in self._readers:
            reader.join(self.timeout)
        return returncode
