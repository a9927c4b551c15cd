"""The probe's cache: the file that keeps each measured choice (`cache_path`), read and written
atomically under a lock, so that runs started together measure once and every later run of the
same command reads the same choice."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: runs started at the same moment may both measure
    fcntl = None  # type: ignore[assignment]

from trainer.atomic import atomic_write_text
from trainer.cache_folder import cache_folder


def cache_path() -> Path:
    """The file that keeps measured choices: ``precision.json`` in `trainer.cache_folder.cache_folder`
    (``$TRAINER_CACHE_DIR``, else ``$XDG_CACHE_HOME/trainer``, else ``~/.cache/trainer``)."""
    return cache_folder() / "precision.json"


@contextlib.contextmanager
def locked(path: Path | None) -> Iterator[None]:
    """Hold an exclusive lock beside the cache file, so that runs started together measure once."""
    if path is None or fcntl is None:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115 - closed below
    except OSError:
        yield  # an unwritable cache: measure without it
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        handle.close()


def cached_setting(entry: Any) -> dict[str, Any] | None:
    """A cache entry as `choose_precision` reads it, or None when it is damaged (then measured again)."""
    if not isinstance(entry, dict):
        return None
    fields = (entry.get("precision"), entry.get("channels_last"), entry.get("onednn"), entry.get("measured"))
    precision, channels_last, onednn, measured = fields
    if precision not in ("32", "bf16") or not isinstance(channels_last, bool) or not isinstance(onednn, bool):
        return None
    return entry if isinstance(measured, str) else None


def read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing, unreadable or damaged: measured again and rewritten
    return data if isinstance(data, dict) else {}


def write_cache(path: Path, key: str, entry: dict[str, Any]) -> str | None:
    """Add `entry` under `key` to the cache file atomically; the reason it failed, or None."""
    data = read_cache(path)
    data[key] = entry
    try:
        atomic_write_text(json.dumps(data, indent=1, sort_keys=True), path)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    return None
