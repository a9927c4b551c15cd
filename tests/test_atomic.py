"""`trainer.atomic`: the one atomic write: a file is replaced whole or not at all."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from trainer.atomic import atomic_write, atomic_write_text, remove_temporary_files


def test_a_failed_write_keeps_the_old_file_and_names_it(tmp_path):
    path = tmp_path / "config.json"
    atomic_write_text("old", path)

    def full_disk(file):
        file.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match="config.json") as caught:
        atomic_write(path, full_disk)
    assert caught.value.errno == errno.ENOSPC
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no temporary file left


def test_a_private_file_is_created_with_its_mode(tmp_path):
    path = atomic_write_text('{"pid": 1}', tmp_path / "entry.json", mode=0o600)
    assert path.read_text() == '{"pid": 1}'
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_temporary_files_of_killed_writers_are_removed(tmp_path):
    (tmp_path / ".last.pt.123.tmp").write_bytes(b"partial")
    (tmp_path / "last.pt").write_bytes(b"whole")
    assert [p.name for p in remove_temporary_files(tmp_path)] == [".last.pt.123.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
