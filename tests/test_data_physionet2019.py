"""The PhysioNet 2019 sepsis loader on small files in the exact raw layout, and on the real data."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from hymate.data import (
    PHYSIONET2019_STATIC,
    PHYSIONET2019_VARIABLES,
    DataError,
    LoadSummary,
    SepsisTask,
    load_dataset,
    load_physionet2019,
)
from hymate.data.physionet2019 import COLUMNS, HEADER, RecordTiming, sepsis_cohort

W = 10  # the small records below are built around a 10-hour observation window


def psv(hours: range | list[int], sepsis_from: int | None = None, static: dict | None = None, **series) -> str:
    """A record file: one row per hour, ``series`` maps a column to {hour: value}."""
    static = {"Age": 50.0, "Gender": 1, "Unit1": 1, "Unit2": 0, "HospAdmTime": -2.5, **(static or {})}
    lines = [HEADER]
    for h in hours:
        row = dict.fromkeys(COLUMNS, "NaN")
        for name, value in static.items():
            row[name] = "NaN" if value is None else str(value)
        for name, by_hour in series.items():
            if h in by_hour:
                row[name] = str(by_hour[h])
        row["ICULOS"] = str(h)
        row["SepsisLabel"] = "1" if sepsis_from is not None and h >= sepsis_from else "0"
        lines.append("|".join(row[c] for c in COLUMNS))
    return "\n".join(lines) + "\n"


RECORDS_A = {
    # kept, negative: values at hours 2, 3 in the window, 11 after it
    "p000001": psv(range(1, 15), HR={2: 80, 3: 82.5, 11: 90}, O2Sat={2: 97}, Lactate={3: 1.4}),
    # kept, positive: label from hour 12, onset 18 > W
    "p000002": psv(range(1, 17), sepsis_from=12, HR={5: 110}, static={"Gender": 0, "Unit1": 0, "Unit2": 1}),
    # onset 3 + 6 = 9 <= W: excluded
    "p000003": psv(range(1, 13), sepsis_from=3, HR={2: 100}),
    # labelled from its first row (hour 6): onset <= 12, maybe inside the window: excluded
    "p000004": psv(range(6, 16), sepsis_from=6, HR={7: 100}),
    # record starts at hour 12, after the window: excluded
    "p000005": psv(range(12, 21), HR={13: 70}),
    # record ends at hour 10, inside the window: excluded
    "p000006": psv(range(1, 11), HR={2: 70}),
    # kept, no measured value in the window, units unknown
    "p000007": psv(range(1, 12), static={"Unit1": None, "Unit2": None, "HospAdmTime": None}),
}
RECORDS_B = {
    "p100001": psv(range(1, 13), HR={10: 60}, static={"Age": 71.5, "Unit1": 0, "Unit2": 1}),
    "p100002": HEADER + "\n",  # header only
}


def write_p19(root: Path, a: dict[str, str] | None = None, b: dict[str, str] | None = None) -> Path:
    for folder, records in (
        ("training_setA", RECORDS_A if a is None else a),
        ("training_setB", RECORDS_B if b is None else b),
    ):
        (root / folder).mkdir(parents=True)
        for name, text in records.items():
            (root / folder / f"{name}.psv").write_text(text)
    return root


def vid(name: str) -> int:
    return PHYSIONET2019_VARIABLES.index(name) + 1


def test_task_values_statics_sites_and_counts(tmp_path):
    root = write_p19(tmp_path)
    summary = LoadSummary("p19")
    table = load_physionet2019(root, summary, observation_hours=W)

    assert table.name == "physionet2019"
    assert table.variables == PHYSIONET2019_VARIABLES and len(table.variables) == 34
    assert table.static_names == PHYSIONET2019_STATIC == ("Age", "Gender", "Unit", "HospAdmTime")
    assert list(table.stay_ids) == ["p000001", "p000002", "p000007", "p100001"]
    assert list(table.patient_ids) == list(table.stay_ids)
    assert list(table.sites) == ["hospital_A", "hospital_A", "hospital_A", "hospital_B"]
    assert list(table.labels) == [0, 1, 0, 0] and table.labels.dtype == np.int8
    assert list(table.lengths) == [4, 1, 0, 1]

    times, ids, values = table.events(0)  # hour 11 is after the window
    np.testing.assert_array_equal(times, [2, 2, 3, 3])
    assert list(ids) == [vid("HR"), vid("O2Sat"), vid("HR"), vid("Lactate")]
    np.testing.assert_allclose(values, [80, 97, 82.5, 1.4], rtol=1e-6)
    np.testing.assert_array_equal(table.events(1)[0], [5])

    nan = np.nan
    np.testing.assert_array_equal(
        table.static,
        np.array([[50, 1, 1, -2.5], [50, 0, 2, -2.5], [50, 1, nan, nan], [71.5, 1, 2, -2.5]], np.float32),
    )
    assert summary.stays == 4 and summary.events == 6
    assert summary.counts == {
        "records_hospital_A": 7,
        "septic_records_hospital_A": 3,
        "records_hospital_B": 1,  # the header-only file is not a record
        "excluded_onset_in_window": 1,
        "excluded_onset_unknown": 1,
        "excluded_no_rows_in_window": 1,
        "excluded_ended_in_window": 1,
        "unit_unknown": 1,
        "stays_without_events": 1,
        "files_without_rows": 1,
    }


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


def test_gap_and_window_change_the_cohort(tmp_path):
    root = write_p19(tmp_path)
    # p000002's onset is hour 18: inside an 8-hour gap after a 10-hour window.
    summary = LoadSummary("p19")
    table = load_physionet2019(root, summary, observation_hours=W, gap_hours=8)
    assert "p000002" not in set(table.stay_ids)
    assert summary.counts["excluded_onset_in_gap"] == 1
    # A 7-hour gap leaves it positive.
    table = load_physionet2019(root, observation_hours=W, gap_hours=7)
    assert table.labels[list(table.stay_ids).index("p000002")] == 1
    # A 4-hour window: p000003 (onset 9) becomes positive, p000006 is followed up beyond it,
    # p000004 (labelled from its first row, hour 6) cannot be placed against the window.
    summary = LoadSummary("p19")
    table = load_physionet2019(root, summary, observation_hours=4, sets=("A",))
    assert table.name == "physionet2019-A"
    assert dict(zip(table.stay_ids, table.labels.tolist(), strict=True)) == {
        "p000001": 0, "p000002": 1, "p000003": 1, "p000006": 0, "p000007": 0,
    }  # fmt: skip
    assert table.times.max() <= 4
    assert _nonzero(summary.counts) == {
        "records_hospital_A": 7,
        "septic_records_hospital_A": 3,
        "excluded_onset_unknown": 1,
        "excluded_no_rows_in_window": 1,
        "unit_unknown": 1,
        "stays_without_events": 2,  # p000002's only value is at hour 5
    }


def test_sepsis_cohort_rules_directly():
    nan = np.nan
    timing = RecordTiming(
        first_hour=np.array([1, 1, 1, 20, 1, 30, 1.0]),
        last_hour=np.array([30, 30, 30, 40, 24, 50, 24.0]),
        t_label=np.array([nan, 19, 18, 20, nan, nan, 20]),
        labelled_from_start=np.array([False, False, False, True, False, False, False]),
    )
    cohort = sepsis_cohort(timing, SepsisTask(observation_hours=24, gap_hours=0))
    # 19 + 6 > 24 positive; 18 + 6 = 24 in window; from-start at 20: unknown; ended at 24;
    # starts at 30; onset 26 after the window but the record ends at 24.
    assert cohort.keep.tolist() == [True, True, False, False, False, False, False]
    assert cohort.labels[cohort.keep].tolist() == [0, 1]
    assert _nonzero(cohort.excluded) == {
        "excluded_onset_in_window": 1,
        "excluded_onset_unknown": 1,
        "excluded_no_rows_in_window": 1,
        "excluded_ended_in_window": 2,
    }


def test_options_are_validated():
    with pytest.raises(ValueError, match="sets must be among"):
        SepsisTask(sets=("C",))
    with pytest.raises(ValueError, match="observation_hours must be > 0"):
        SepsisTask(observation_hours=0)
    with pytest.raises(ValueError, match="gap_hours must be >= 0"):
        SepsisTask(gap_hours=-1)
    with pytest.raises(TypeError):
        load_physionet2019("/nonexistent", window=3)
    assert SepsisTask().cache_key == "physionet2019-w24-g0-v1"
    assert SepsisTask(observation_hours=12, gap_hours=6, sets=("B",)).cache_key == "physionet2019-B-w12-g6-v1"


GOOD = psv(range(1, 13), Temp={2: 37.5})
BAD_RECORDS = {
    "wrong header": (GOOD.replace("HR|O2Sat", "HR,O2Sat"), ["p000009.psv:1", "header"]),
    "empty file": ("", ["p000009.psv:1", "empty file"]),
    "too few fields": (GOOD + "1|2|3\n", ["p000009.psv:14", "expected 41", "found 3"]),
    "non-numeric value": (GOOD.replace("|37.5|", "|warm|"), ["p000009.psv:3", "Temp", "'warm'", "not a number"]),
    "infinite value": (GOOD.replace("|37.5|", "|inf|"), ["p000009.psv:3", "Temp", "not finite"]),
    "empty value": (GOOD.replace("|37.5|", "||"), ["p000009.psv:3", "Temp", "''", "not a number"]),
    "ICULOS not increasing": (GOOD + GOOD.splitlines()[5] + "\n", ["p000009.psv:14", "ICULOS 5", "does not increase"]),
    "ICULOS missing": (psv([1, 2]).replace("|2|0\n", "|NaN|0\n"), ["p000009.psv:3", "ICULOS is missing"]),
    "SepsisLabel not 0/1": (GOOD.replace("|3|0\n", "|3|2\n"), ["p000009.psv:4", "SepsisLabel is 2"]),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_raises_dataerror_naming_file_and_line(tmp_path, case):
    text, expected = BAD_RECORDS[case]
    root = write_p19(tmp_path, a={"p000001": GOOD, "p000009": text, "p000010": GOOD}, b={})
    with pytest.raises(DataError) as err:
        load_physionet2019(root, sets=("A",))
    for fragment in expected:
        assert fragment in str(err.value)


def test_missing_folders_and_duplicate_records(tmp_path):
    with pytest.raises(DataError, match="PhysioNet 2019 folder not found"):
        load_physionet2019(tmp_path / "nowhere")
    root = write_p19(tmp_path / "one", b={})
    (root / "training_setB").rmdir()
    with pytest.raises(DataError, match=r"training_setB: set folder not found"):
        load_physionet2019(root)
    (root / "training_setB").mkdir()
    with pytest.raises(DataError, match=r"training_setB: no record files"):
        load_physionet2019(root)
    root = write_p19(tmp_path / "two", b={"p000001": GOOD})
    with pytest.raises(DataError, match="record p000001 also occurs in another set"):
        load_physionet2019(root)


def test_crlf_and_blank_lines_are_tolerated(tmp_path):
    text = GOOD.replace("\n", "\r\n") + "\r\n\r\n"
    root = write_p19(tmp_path, a={"p000001": GOOD, "p000002": text}, b={})
    table = load_physionet2019(root, sets=("A",), observation_hours=W)
    assert list(table.stay_ids) == ["p000001", "p000002"]
    np.testing.assert_array_equal(table.values, [37.5, 37.5])
    np.testing.assert_array_equal(table.times, [2, 2])


def test_load_dataset_dispatch_and_cache_per_task(tmp_path):
    root = write_p19(tmp_path / "raw")
    cache = tmp_path / "cache"
    first = load_dataset("physionet2019", root, cache_dir=cache, observation_hours=W)
    summary = LoadSummary("p19")
    again = load_dataset("physionet2019", root, cache_dir=cache, summary=summary, observation_hours=W)
    assert list(again.stay_ids) == list(first.stay_ids)
    np.testing.assert_array_equal(again.values, first.values)
    np.testing.assert_array_equal(again.static, first.static)
    assert summary.counts["excluded_onset_unknown"] == 1  # the summary survives the cache
    other = load_dataset("physionet2019", root, cache_dir=cache, observation_hours=4)
    assert len(other) == 6 and other.times.max() <= 4
    assert sorted(p.name.rsplit("-", 2)[0] for p in cache.iterdir()) == [
        "physionet2019-w10-g0-v1",
        "physionet2019-w4-g0-v1",
    ]
    with pytest.raises(ValueError, match="valid names: eicu, mimic4, physionet2012, physionet2019, synthetic"):
        load_dataset("physionet2020", root)


@pytest.mark.realdata
def test_real_physionet2019(p19_root):
    """All 40,336 records under the default task (24-hour window, no gap); counts checked
    against an independent plain-Python pass over the files."""
    cache_dir = Path(__file__).resolve().parents[1] / ".cache" / "parsed"
    summary = LoadSummary("physionet2019")
    start = time.perf_counter()
    table = load_dataset("physionet2019", p19_root, cache_dir=cache_dir, summary=summary)
    logging.getLogger(__name__).info("real P19 load: %.1f s", time.perf_counter() - start)

    c = summary.counts
    assert (c["records_hospital_A"], c["records_hospital_B"]) == (20_336, 20_000)
    assert (c["septic_records_hospital_A"], c["septic_records_hospital_B"]) == (1_790, 1_142)
    assert _nonzero({k: v for k, v in c.items() if k.startswith("excluded_")}) == {
        "excluded_onset_in_window": 1_195,
        "excluded_no_rows_in_window": 15,
        "excluded_ended_in_window": 9_018,
    }
    assert len(table) == 30_108 == 40_336 - 1_195 - 15 - 9_018
    per_site = {
        s: (int((table.sites == s).sum()), int(table.labels[table.sites == s].sum())) for s in table.site_names()
    }
    assert per_site == {"hospital_A": (15_703, 1_072), "hospital_B": (14_405, 663)}
    assert table.n_events == summary.events == 4_933_522
    assert c["stays_without_events"] == 2 == int((table.lengths == 0).sum())
    assert c["unit_unknown"] == 11_581 == int(np.isnan(table.static[:, 2]).sum())
    assert table.times.min() >= 1 and table.times.max() == 24

    i = list(table.stay_ids).index("p000001")  # the first record of set A (see its file)
    assert table.labels[i] == 0 and table.sites[i] == "hospital_A"
    np.testing.assert_allclose(table.static[i], [83.14, 0, np.nan, -0.03], rtol=1e-6)
    times, ids, values = table.events(i)
    assert times[0] == 2 and table.variables[ids[0] - 1] == "HR" and values[0] == 97


def test_a_value_beyond_float32_names_file_and_line(tmp_path):
    # 1e39 is finite as float64 but parses to inf as float32: once reported for the folder only.
    root = write_p19(tmp_path, a={"p000001": GOOD, "p000009": GOOD.replace("|37.5|", "|1e39|")}, b={})
    with pytest.raises(DataError, match=r"p000009\.psv:3: Temp value '1e39' is beyond the float32 range"):
        load_physionet2019(root, sets=("A",))


def test_a_folder_holding_only_set_a_loads_with_sets_and_says_so_without(tmp_path):
    root = write_p19(tmp_path / "raw", b={})
    (root / "training_setB").rmdir()
    with pytest.raises(DataError, match=r"sets present \(A\), pass sets=\('A',\) or hymate-sim --sets A"):
        load_dataset("physionet2019", root, cache_dir=None)
    table = load_dataset("physionet2019", root, cache_dir=tmp_path / "cache", sets=["A"], observation_hours=W)
    assert table.name == "physionet2019-A" and set(table.sites) == {"hospital_A"} and len(table) == 3
    (entry,) = (tmp_path / "cache").iterdir()
    assert entry.name.startswith("physionet2019-A-w10-g0-v1-")


def test_no_stay_left_after_the_exclusions_is_a_data_error(tmp_path):
    # Every record ends inside a 20-hour window: all excluded (once an IndexError or an empty run).
    root = write_p19(tmp_path, a={"p000006": RECORDS_A["p000006"]}, b={})
    with pytest.raises(DataError) as err:
        load_dataset("physionet2019", root, cache_dir=None, sets=("A",), observation_hours=20)
    assert str(err.value).startswith(f"{root}: physionet2019 has no stays left after its exclusions (")
    assert "excluded_ended_in_window: 1" in str(err.value)
