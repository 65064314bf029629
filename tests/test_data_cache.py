"""Parquet cache: exact round trip, fingerprinting, atomic writes, corrupt-cache recovery."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from hymate.data import (
    DataError,
    LoadSummary,
    StayRecord,
    StayTable,
    SyntheticConfig,
    cached,
    fingerprint,
    load_table,
    make_synthetic,
    save_table,
    table_from_stays,
)

FIELDS = ("stay_ids", "patient_ids", "sites", "labels", "static", "offsets", "times",
          "variable_ids", "values")  # fmt: skip


def assert_tables_equal(a: StayTable, b: StayTable) -> None:
    assert (a.name, a.variables, a.static_names) == (b.name, b.variables, b.static_names)
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        assert x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)  # NaN == NaN here


@pytest.fixture(scope="module")
def table() -> StayTable:
    return make_synthetic(SyntheticConfig(seed=4, stays_per_site=60))


def test_round_trip_exact(table, tmp_path):
    summary = LoadSummary("synthetic", stays=len(table), events=table.n_events, counts={"x": 3})
    save_table(table, tmp_path / "t", summary)
    got = LoadSummary("synthetic")
    restored = load_table(tmp_path / "t", got)
    assert_tables_equal(table, restored)
    assert np.isnan(restored.static).any()
    assert (got.stays, got.events, got.counts) == (len(table), table.n_events, {"x": 3})
    assert isinstance(restored.stay_ids[0], str)


def test_round_trip_edge_cases(tmp_path):
    stays = [
        StayRecord("a", "p", "s,1", 1, [], [], [], []),  # no events, no statics, odd site name
        StayRecord("b", "p", "s,1", 0, [], [2.0, 1.0], [1, 1], [np.float32(0.1), -3.5]),
    ]
    t = table_from_stays("edge", ["v"], [], stays)
    save_table(t, tmp_path / "edge")
    assert_tables_equal(t, load_table(tmp_path / "edge"))
    empty = t.subset([])
    save_table(empty, tmp_path / "empty")
    assert_tables_equal(empty, load_table(tmp_path / "empty"))


def test_overwrite_leaves_no_temporaries(table, tmp_path):
    save_table(table, tmp_path / "t")
    smaller = table.subset(np.arange(10))
    save_table(smaller, tmp_path / "t")
    assert_tables_equal(smaller, load_table(tmp_path / "t"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_interrupted_write_leaves_old_cache(table, tmp_path, monkeypatch):
    save_table(table, tmp_path / "t")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("hymate.data.cache.pq.write_table", boom)
    with pytest.raises(KeyboardInterrupt):
        save_table(table.subset([0]), tmp_path / "t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    assert_tables_equal(table, load_table(tmp_path / "t"))


def _write_raw(root: Path, n: int) -> None:
    root.mkdir(exist_ok=True)
    for i in range(n):
        (root / f"{i}.txt").write_text(f"{i}\n")


class CountingLoader:
    """A loader that reads one stay per raw file and counts how often it runs."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, root: Path, summary: LoadSummary) -> StayTable:
        self.calls += 1
        files = sorted(root.glob("*.txt"))
        summary.stays = len(files)
        summary.count("parsed_files", len(files))
        stays = [StayRecord(f.stem, f.stem, "s", 0, [1.0], [0.0], [1], [float(f.read_text())]) for f in files]
        return table_from_stays("raw", ["v"], ["a"], stays)


def test_cached_parses_once_and_notices_changes(tmp_path):
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    _write_raw(raw, 3)
    loader = CountingLoader()
    first = cached(loader, raw, cache, "demo-v1")
    summary = LoadSummary("demo")
    second = cached(loader, raw, cache, "demo-v1", summary)
    assert loader.calls == 1
    assert_tables_equal(first, second)
    assert summary.counts == {"parsed_files": 3} and summary.stays == 3

    (raw / "3.txt").write_text("3\n")  # a new raw file: new fingerprint, re-parse
    third = cached(loader, raw, cache, "demo-v1")
    assert loader.calls == 2 and len(third) == 4
    assert len(list(cache.iterdir())) == 1  # the stale entry was removed

    stat = os.stat(raw / "0.txt")
    (raw / "0.txt").write_text("7\n")  # same size, new content
    os.utime(raw / "0.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cached(loader, raw, cache, "demo-v1").values[0] == 7.0
    assert loader.calls == 3


def test_corrupt_cache_is_reparsed(tmp_path, caplog):
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    _write_raw(raw, 3)
    loader = CountingLoader()
    good = cached(loader, raw, cache, "demo")
    (entry,) = cache.iterdir()
    events = entry / "events.parquet"
    events.write_bytes(events.read_bytes()[: len(events.read_bytes()) // 2])  # truncated
    with caplog.at_level(logging.WARNING):
        again = cached(loader, raw, cache, "demo")
    assert loader.calls == 2 and "unreadable table cache" in caplog.text
    assert_tables_equal(good, again)
    assert_tables_equal(good, cached(loader, raw, cache, "demo"))
    assert loader.calls == 2  # the rewritten cache is used again

    (entry / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable table cache"):
        load_table(entry)
    assert_tables_equal(good, cached(loader, raw, cache, "demo"))
    assert loader.calls == 3


def test_fingerprint_and_key_validation(tmp_path):
    _write_raw(tmp_path / "raw", 2)
    fp = fingerprint(tmp_path / "raw")
    assert fp == fingerprint(tmp_path / "raw") and len(fp) == 16
    with pytest.raises(DataError, match="not found"):
        fingerprint(tmp_path / "nope")
    with pytest.raises(ValueError, match="plain file name"):
        cached(CountingLoader(), tmp_path / "raw", tmp_path / "c", "../escape")


def test_in_place_edit_keeping_size_and_mtime_is_noticed(tmp_path):
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    _write_raw(raw, 3)
    loader = CountingLoader()
    assert cached(loader, raw, cache, "demo").values[0] == 0.0
    stat = os.stat(raw / "0.txt")
    (raw / "0.txt").write_text("7\n")  # same size, new content, and the mtime forced back
    os.utime(raw / "0.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(raw / "0.txt").st_mtime_ns == stat.st_mtime_ns
    assert cached(loader, raw, cache, "demo").values[0] == 7.0
    assert loader.calls == 2


def test_files_in_a_linked_folder_are_fingerprinted(tmp_path):
    real, raw, cache = tmp_path / "elsewhere", tmp_path / "raw", tmp_path / "cache"
    _write_raw(real, 2)
    raw.mkdir()
    (raw / "set-a").symlink_to(real, target_is_directory=True)
    (raw / "loop").symlink_to(raw, target_is_directory=True)  # a cycle is walked once, not forever

    def loader(root: Path, summary: LoadSummary) -> StayTable:
        loader.calls += 1
        return CountingLoader()(root / "set-a", summary)

    loader.calls = 0
    assert len(cached(loader, raw, cache, "demo")) == 2
    (real / "2.txt").write_text("2\n")  # a new file inside the linked folder
    assert len(cached(loader, raw, cache, "demo")) == 3
    assert loader.calls == 2


def test_two_roots_with_the_same_layout_do_not_share_an_entry(tmp_path):
    first, second, cache = tmp_path / "one" / "raw", tmp_path / "two" / "raw", tmp_path / "cache"
    for root, value in ((first, "1\n"), (second, "2\n")):
        root.mkdir(parents=True)
        (root / "0.txt").write_text(value)
        os.utime(root / "0.txt", ns=(10**18, 10**18))  # identical names, sizes and mtimes
    loader = CountingLoader()
    (cache / "demo-0123456789abcdef").mkdir(parents=True)  # an entry named before roots were in the key
    assert cached(loader, first, cache, "demo").values[0] == 1.0
    assert not (cache / "demo-0123456789abcdef").exists()
    assert cached(loader, second, cache, "demo").values[0] == 2.0
    assert cached(loader, first, cache, "demo").values[0] == 1.0  # each root keeps its own entry
    assert loader.calls == 2 and len(list(cache.iterdir())) == 2


def test_a_dangling_link_is_a_data_error_naming_it(tmp_path):
    _write_raw(tmp_path / "raw", 1)
    (tmp_path / "raw" / "gone.txt").symlink_to(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="gone.txt: cannot read the raw file"):
        fingerprint(tmp_path / "raw")
