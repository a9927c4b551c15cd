"""`trainer.callbacks.csv_logger`: CSVLogger."""

from __future__ import annotations

import csv
import errno
import io
import os
from types import SimpleNamespace

import pytest

from tests.helpers import make
from trainer.callbacks import CSVLogger


# ------------------------------------------------------------------------------------------ CSVLogger
def test_csv_logger_writes_every_value_of_every_epoch_and_step_validation(tmp_path):
    path = tmp_path / "logs" / "metrics.csv"
    trainer, train, val = make([CSVLogger(path)], epochs=2, val_every_n_steps=4)
    history = trainer.fit(train, val)
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert list(rows[0]) == ["epoch", "step", "val_loss", "val_acc", "loss", "lr"]
    assert [(row["epoch"], row["step"]) for row in rows] == [
        ("0", "4"),
        ("0", "8"),
        ("0", "10"),
        ("1", "12"),
        ("1", "16"),
        ("1", "20"),
    ]
    epoch_rows = [row for row in rows if row["loss"]]
    assert [
        {key: float(value) for key, value in row.items() if key not in ("epoch", "step")} for row in epoch_rows
    ] == history
    assert rows[0]["loss"] == "" and not list(tmp_path.glob("logs/.*"))


def test_csv_logger_starts_a_new_file_for_a_new_fit(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("old,rows\n1,2\n")
    trainer, train, val = make([CSVLogger(path)], epochs=1)
    trainer.fit(train, val)
    assert path.read_text().splitlines()[0] == "epoch,step,loss,val_loss,val_acc,lr"
    assert len(path.read_text().splitlines()) == 2


def test_csv_logger_cuts_a_row_a_full_disk_broke_back_to_the_last_whole_row(tmp_path, mocker):
    path = tmp_path / "metrics.csv"
    logger = CSVLogger(path)
    trainer = SimpleNamespace(epoch=0, global_step=2, start_step=0, in_step_validation=False)
    logger.on_fit_start(trainer)
    logger.on_epoch_end(trainer, {"loss": 0.5})
    whole = path.read_bytes()

    class HalfARowThenFull:  # what a write on a full disk does: part of the row lands, then ENOSPC
        def __init__(self, file, fields):
            self.file = file

        def writerow(self, row):
            self.file.write("1,4,0.2")
            self.file.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    mocker.patch("trainer.callbacks.csv_logger.csv.DictWriter", HalfARowThenFull)
    trainer.epoch, trainer.global_step = 1, 4
    with pytest.raises(OSError, match="No space left on device") as full:
        logger.on_epoch_end(trainer, {"loss": 0.4})
    assert full.value.filename == str(path) and path.read_bytes() == whole
