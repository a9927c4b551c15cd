"""The command line ``python -m trainer.board PATH [--port P] [--host H]``: serve TensorBoard on a run
directory or a folder of runs until Ctrl-C, SIGTERM or SIGHUP, recorded in the registry meanwhile."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from trainer.board import registry, servers
from trainer.board.server import start


def main(argv: list[str] | None = None) -> int:
    """Command line: serve TensorBoard on a run directory until Ctrl-C, SIGTERM or SIGHUP, recorded
    in the registry of `trainer.board.servers` meanwhile; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m trainer.board",
        description="Open TensorBoard on a run directory or a folder of runs.",
    )
    parser.add_argument("path", help="a run directory or a folder of runs holding event files")
    parser.add_argument("--port", type=int, default=None, help="port to serve on (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    args = parser.parse_args(argv)
    stopping = threading.Event()
    handlers = {}
    for name in ("SIGTERM", "SIGHUP"):  # a plain kill or a closed terminal: clean up as for Ctrl-C
        if hasattr(signal, name):
            handlers[name] = signal.signal(getattr(signal, name), lambda *_: stopping.set())
    try:
        try:
            registry.private_registry_dir()  # a registry another user could plant in: refused before serving
            board = start(args.path, port=args.port, host=args.host)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        path = os.fspath(board.path.resolve())
        servers.register(servers.BoardServer(path, os.getpid(), board.port, board.host, board.url))
        try:
            print(f"TensorBoard on {os.fspath(board.path)}: {board.url}", flush=True)
            stopping.wait()
        except KeyboardInterrupt:
            pass
        finally:
            board.stop()  # the port closed and the links removed before the entry goes:
            servers.unregister(path, os.getpid())  # `stop` waits for the entry
    finally:
        for name, handler in handlers.items():
            signal.signal(getattr(signal, name), handler)
    return 0
