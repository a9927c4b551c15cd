"""`trainer/cache_folder.py`: one cache folder for the precision measurements and the index files
of streamed segmentation folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.cache_folder import cache_folder
from trainer.probe_cache import cache_path
from trainer_datasets import SegmentationStream, SyntheticNuclei
from trainer_datasets.segmentation_stream import index_file


@pytest.mark.parametrize(
    "environment, expected",
    [
        ({"TRAINER_CACHE_DIR": "t", "XDG_CACHE_HOME": "x"}, "t"),
        ({"TRAINER_CACHE_DIR": "", "XDG_CACHE_HOME": "x"}, "x/trainer"),
        ({"XDG_CACHE_HOME": "x"}, "x/trainer"),
        ({"XDG_CACHE_HOME": ""}, "home/.cache/trainer"),
        ({}, "home/.cache/trainer"),
    ],
)
def test_precision_and_segmentation_indexes_share_the_folder_the_environment_names(
    monkeypatch, tmp_path, environment, expected
):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("TRAINER_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
        if name in environment:
            monkeypatch.setenv(name, str(tmp_path / environment[name]) if environment[name] else "")
    folder = tmp_path / expected
    assert cache_folder() == folder
    assert cache_path() == folder / "precision.json"
    assert index_file(tmp_path / "data").parent == folder / "segmentation-index"


def test_a_streamed_folder_keeps_its_index_in_the_cache_folder(monkeypatch, tmp_path):
    """Without an index folder, a stream writes its index where `cache_folder` says, and a second
    stream of the unchanged folder reads it back (the same items, one index file)."""
    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path / "cache"))
    data = SyntheticNuclei(3, image_size=16, seed=2).save(tmp_path / "data")
    first = SegmentationStream(data)
    written = sorted(Path(tmp_path / "cache" / "segmentation-index").iterdir())
    assert [p.name for p in written] == [index_file(data).name]
    second = SegmentationStream(data)
    assert sorted((tmp_path / "cache" / "segmentation-index").iterdir()) == written
    assert all(a.equal(b) for i in range(3) for a, b in zip(first[i], second[i]))
