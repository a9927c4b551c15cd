"""`CSVLogger`: every value of the logs in a CSV file, one row per epoch and per step validation."""

from __future__ import annotations

import contextlib
import csv
import io
import os
from pathlib import Path
from typing import Any

from trainer.atomic import atomic_write_text
from trainer.callback import Callback


class CSVLogger(Callback):
    """Write one CSV row per epoch (and per step validation, see
    ``Trainer(val_every_n_steps=...)``) with every value of its logs.

    Columns: ``epoch`` (0-based), ``step`` (the global step), then the logs' keys in the order
    they first appeared (``loss``, ``val_loss``, ``val_<metric>``, ``lr``); a value a row lacks
    (a step validation has no ``loss``) is left empty. A key that appears later rewrites the
    file with the wider header. Each row is flushed to the file as it is written; a write that
    fails (a full disk) leaves the file at its last whole row and raises an `OSError` naming it.

    A new fit starts a new file; a resumed fit keeps the rows written up to its checkpoint (the
    number of rows travels in `state_dict`) and appends after them, so rows a killed process
    wrote after its last checkpoint are not repeated.

    Args:
        path: the CSV file; its folder is created.
    """

    rank_zero_only = True

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._rows: list[dict[str, Any]] = []
        self._fields: list[str] = []
        self._kept: int | None = None  # rows of the checkpoint a fit resumes from

    def on_fit_start(self, trainer) -> None:
        rows = []
        if trainer.start_step > 0 and self.path.is_file():
            with open(self.path, newline="") as file:
                rows = list(csv.DictReader(file))
            if self._kept is not None:
                rows = rows[: self._kept]
            else:  # a checkpoint without this callback's state: keep the rows up to its step
                rows = [row for row in rows if int(row["step"]) <= trainer.start_step]
        self._rows, self._fields, self._kept = [], [], None
        for row in rows:
            self._add_fields(row)
            self._rows.append(row)
        self._rewrite()

    def on_validation_end(self, trainer, logs) -> None:
        if trainer.in_step_validation:
            self._write(trainer, logs)

    def on_epoch_end(self, trainer, logs) -> None:
        self._write(trainer, logs)

    def _write(self, trainer, logs: dict[str, float]) -> None:
        row = {"epoch": trainer.epoch, "step": trainer.global_step, **logs}
        self._rows.append(row)
        if self._add_fields(row):
            self._rewrite()
        else:
            self._append(row)

    def _append(self, row: dict[str, Any]) -> None:
        """Append `row`; a failed write (a full disk) cuts the file back to its last whole row
        and raises an `OSError` naming the file."""
        size = self.path.stat().st_size
        try:
            with open(self.path, "a", newline="") as file:
                csv.DictWriter(file, self._fields).writerow(row)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.truncate(self.path, size)
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc

    def _add_fields(self, row: dict[str, Any]) -> bool:
        new = [key for key in row if key not in self._fields]
        self._fields += new
        return bool(new)

    def _rewrite(self) -> None:
        """Write the whole file anew, atomically (a temporary file renamed over it)."""
        text = io.StringIO()
        writer = csv.DictWriter(text, self._fields or ["epoch", "step"])
        writer.writeheader()
        writer.writerows(self._rows)
        atomic_write_text(text.getvalue(), self.path)

    def state_dict(self) -> dict[str, Any]:
        """The number of rows written."""
        return {"rows": len(self._rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self._kept = state["rows"]
