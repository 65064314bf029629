"""The PhysioNet 2012 loader on small files in the exact raw layout, and on the real data."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import pytest

from hymate.data import (
    PHYSIONET2012_STATIC,
    PHYSIONET2012_VARIABLES,
    DataError,
    LoadSummary,
    load_dataset,
    load_physionet2012,
    load_physionet2012_by_set,
)

HEADER = "Time,Parameter,Value"

# Record 1: statics, a later Weight, an empty parameter, an unknown parameter, a -1 value.
RECORD_1 = """Time,Parameter,Value
00:00,RecordID,132539
00:00,Age,54
00:00,Gender,0
00:00,Height,-1
00:00,ICUType,4
00:00,Weight,80.5
00:07,GCS,15
00:07,HR,73
00:37,HR,77
01:30,,3.1
02:15,Foo,9
03:05,NIDiasABP,-1
12:00,Weight,79.0
48:00,pH,7.35
"""
# Record 2: statics only (no time-series row), ICUType 2, Weight unknown.
RECORD_2 = """Time,Parameter,Value
00:00,RecordID,132540
00:00,Age,76
00:00,Gender,1
00:00,Height,175.3
00:00,ICUType,2
00:00,Weight,-1
"""
# Record 3: statics interleaved with time-series rows at 00:00, a second Weight at 00:00,
# no ICUType at all.
RECORD_3 = """Time,Parameter,Value
00:00,RecordID,132541
00:00,Age,35
00:00,DiasABP,83
00:00,Gender,1
00:00,Height,-1
00:00,Weight,70.8
00:00,Weight,70.4
00:30,Temp,36.6
"""
OUTCOMES = """RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death
132539,6,1,5,-1,0
132540,16,8,8,-1,1
132541,21,11,19,-1,0
"""


def write_p12(root: Path, records: dict[str, str] | None = None, outcomes: str = OUTCOMES) -> Path:
    """A one-set ("a") PhysioNet 2012 folder with the given record files."""
    records = records or {"132539": RECORD_1, "132540": RECORD_2, "132541": RECORD_3}
    (root / "set-a").mkdir(parents=True)
    for rid, text in records.items():
        (root / "set-a" / f"{rid}.txt").write_text(text)
    (root / "Outcomes-a.txt").write_text(outcomes)
    return root


def vid(name: str) -> int:
    return PHYSIONET2012_VARIABLES.index(name) + 1


def test_parses_values_statics_labels_and_sites(tmp_path, caplog):
    root = write_p12(tmp_path)
    summary = LoadSummary("p12")
    with caplog.at_level(logging.WARNING):
        table = load_physionet2012(root, sets=("a",), summary=summary)

    assert table.name == "physionet2012-a"
    assert table.variables == PHYSIONET2012_VARIABLES and len(table.variables) == 37
    assert table.static_names == PHYSIONET2012_STATIC
    assert list(table.stay_ids) == ["132539", "132540", "132541"]
    assert list(table.patient_ids) == list(table.stay_ids)
    assert list(table.labels) == [0, 1, 0]
    assert list(table.sites) == ["surgical", "cardiac_surgery", "unknown"]
    assert list(table.lengths) == [5, 0, 3]

    times, ids, values = table.events(0)
    np.testing.assert_allclose(times, [7 / 60, 7 / 60, 37 / 60, 12.0, 48.0], rtol=1e-6)
    assert list(ids) == [vid("GCS"), vid("HR"), vid("HR"), vid("Weight"), vid("pH")]
    np.testing.assert_allclose(values, [15, 73, 77, 79.0, 7.35], rtol=1e-6)

    # -1 -> NaN for statics; time-0 Weight is static, the 12:00 one an event.
    np.testing.assert_array_equal(table.static[0], np.array([54, 0, np.nan, 4, 80.5], np.float32))
    np.testing.assert_array_equal(table.static[1], np.array([76, 1, 175.3, 2, np.nan], np.float32))
    # Interleaved statics are found; the second Weight at 00:00 is a time-series event.
    np.testing.assert_array_equal(table.static[2], np.array([35, 1, np.nan, np.nan, 70.8], np.float32))
    times, ids, values = table.events(2)
    assert list(ids) == [vid("DiasABP"), vid("Weight"), vid("Temp")]
    np.testing.assert_allclose(values, [83, 70.4, 36.6], rtol=1e-6)
    np.testing.assert_allclose(times, [0, 0, 0.5])

    assert summary.stays == 3 and summary.events == 8
    assert summary.counts == {
        "empty_parameter_rows": 1,
        "unknown_parameter_rows": 1,
        "minus_one_values_dropped": 1,
        "stays_without_events": 1,
        "missing_icutype": 1,
    }
    assert "Foo" in caplog.text


def test_by_set_and_combined_order(tmp_path):
    root = write_p12(tmp_path)
    (root / "set-b").mkdir()
    (root / "set-b" / "140001.txt").write_text(
        "Time,Parameter,Value\n00:00,RecordID,140001\n00:00,ICUType,1\n01:00,HR,90\n"
    )
    (root / "Outcomes-b.txt").write_text(
        "RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death\n140001,1,1,1,1,1\n"
    )
    by_set = load_physionet2012_by_set(root, sets=("a", "b"))
    assert [len(by_set["a"]), len(by_set["b"])] == [3, 1]
    assert list(by_set["b"].sites) == ["coronary_care"]
    both = load_physionet2012(root, sets=("b", "a"))
    assert both.name == "physionet2012-ba"
    assert list(both.stay_ids) == ["140001", "132539", "132540", "132541"]


def test_outcome_without_record_is_counted(tmp_path):
    root = write_p12(tmp_path, outcomes=OUTCOMES + "132599,1,1,1,1,0\n")  # a partial copy of the set
    summary = LoadSummary("p12")
    load_physionet2012(root, sets=("a",), summary=summary)
    assert summary.counts["outcomes_without_record"] == 1


BAD_RECORDS = {
    "wrong header": (
        RECORD_2.replace(HEADER, "Time;Parameter;Value"),
        ["132540.txt:1", "header"],
    ),
    "empty file": ("", ["132540.txt:1", "header"]),
    "non-numeric value": (RECORD_2 + "01:00,HR,abc\n", ["132540.txt:8", "'abc'", "not a number"]),
    "non-finite value": (RECORD_2 + "01:00,HR,nan\n", ["132540.txt:8", "not finite"]),
    "malformed time": (RECORD_2 + "1h30,HR,80\n", ["132540.txt:8", "malformed time", "'1h30'"]),
    "bad minutes": (RECORD_2 + "01:75,HR,80\n", ["132540.txt:8", "malformed time"]),
    "too many fields": (RECORD_2 + "01:00,HR,80,1\n", ["132540.txt:8", "3 comma-separated"]),
    "no RecordID": (
        RECORD_2.replace("00:00,RecordID,132540\n", ""),
        ["132540.txt", "no RecordID"],
    ),
    "bad ICUType": (RECORD_2.replace("ICUType,2", "ICUType,7"), ["132540.txt", "ICUType 7"]),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_raises_dataerror_naming_file_and_problem(tmp_path, case):
    text, expected = BAD_RECORDS[case]
    root = write_p12(tmp_path, {"132539": RECORD_1, "132540": text, "132541": RECORD_3})
    with pytest.raises(DataError) as err:
        load_physionet2012(root, sets=("a",))
    for fragment in expected:
        assert fragment in str(err.value)


BAD_OUTCOMES = {
    "record not covered": (
        OUTCOMES.replace("132541,21,11,19,-1,0\n", ""),
        ["Outcomes-a.txt", "no outcome for record 132541"],
    ),
    "label not 0/1": (
        OUTCOMES.replace("132540,16,8,8,-1,1", "132540,16,8,8,-1,2"),
        ["Outcomes-a.txt:3", "record 132540", "'2'", "0 or 1"],
    ),
    "missing label column": (
        OUTCOMES.replace("In-hospital_death", "Death"),
        ["Outcomes-a.txt:1", "In-hospital_death"],
    ),
    "duplicate record": (OUTCOMES + "132541,21,11,19,-1,0\n", ["Outcomes-a.txt:5", "twice"]),
}


@pytest.mark.parametrize("case", sorted(BAD_OUTCOMES))
def test_bad_outcomes_raise_dataerror(tmp_path, case):
    text, expected = BAD_OUTCOMES[case]
    root = write_p12(tmp_path, outcomes=text)
    with pytest.raises(DataError) as err:
        load_physionet2012(root, sets=("a",))
    for fragment in expected:
        assert fragment in str(err.value)


def test_missing_set_folder_or_outcomes_file(tmp_path):
    root = write_p12(tmp_path)
    with pytest.raises(DataError, match=r"set-b: set folder not found"):
        load_physionet2012(root, sets=("a", "b"))
    (root / "Outcomes-a.txt").unlink()
    with pytest.raises(DataError, match=r"Outcomes-a\.txt: outcomes file not found"):
        load_physionet2012(root, sets=("a",))
    with pytest.raises(ValueError, match="sets must be among"):
        load_physionet2012(root, sets=("d",))


def test_duplicate_record_id_across_files(tmp_path):
    root = write_p12(tmp_path, {"132539": RECORD_1, "132540": RECORD_2, "x": RECORD_2})
    with pytest.raises(DataError, match=r"x\.txt: RecordID 132540 already read from .*132540\.txt"):
        load_physionet2012(root, sets=("a",))


def test_load_dataset_dispatch_and_cache(tmp_path):
    root = write_p12(tmp_path / "raw")
    summary = LoadSummary("p12")
    first = load_dataset("physionet2012", root, cache_dir=tmp_path / "cache", sets=("a",))
    again = load_dataset("physionet2012", root, cache_dir=tmp_path / "cache", sets=("a",), summary=summary)
    assert list(again.stay_ids) == list(first.stay_ids)
    np.testing.assert_array_equal(again.values, first.values)
    assert summary.counts["stays_without_events"] == 1  # the summary survives the cache
    assert len(list((tmp_path / "cache").iterdir())) == 1
    with pytest.raises(ValueError, match="valid names: eicu, mimic4, physionet2012, physionet2019, synthetic"):
        load_dataset("mimic3", root)


@pytest.mark.realdata
def test_real_physionet2012(p12_root):
    cache_dir = Path(__file__).resolve().parents[1] / ".cache" / "parsed"
    summary = LoadSummary("physionet2012")
    start = time.perf_counter()
    table = load_dataset("physionet2012", p12_root, cache_dir=cache_dir, summary=summary)
    logging.getLogger(__name__).info("real P12 load: %.1f s", time.perf_counter() - start)

    assert len(table) == 12_000 and len(set(table.stay_ids)) == 12_000
    assert len(table.variables) == 37
    assert summary.counts["stays_without_events"] == 12 == int((table.lengths == 0).sum())
    assert summary.counts["empty_parameter_rows"] == 2_403
    assert summary.counts["minus_one_values_dropped"] == 224
    assert "unknown_parameter_rows" not in summary.counts
    assert "missing_icutype" not in summary.counts
    assert table.n_events == summary.events == 5_211_191
    assert table.times.max() == 48.0 and table.times.min() == 0.0
    sites = {s: int((table.sites == s).sum()) for s in table.site_names()}
    assert sites == {"cardiac_surgery": 2530, "coronary_care": 1769, "medical": 4293,
                     "surgical": 3408}  # fmt: skip

    # Deaths per set; sets are contiguous in table order (a, b, c; 4,000 each).
    deaths = [int(table.labels[i * 4000 : (i + 1) * 4000].sum()) for i in range(3)]
    assert deaths == [554, 568, 585]
    by_id = dict(zip(table.stay_ids, range(len(table)), strict=True))
    i = by_id["132539"]  # the first record of set-a (see its file)
    assert table.labels[i] == 0 and table.sites[i] == "surgical"
    np.testing.assert_array_equal(table.static[i], np.array([54, 0, np.nan, 4, np.nan], np.float32))
    times, ids, values = table.events(i)
    assert math.isclose(float(times[0]), 7 / 60, rel_tol=1e-6)
    assert table.variables[ids[0] - 1] == "GCS" and values[0] == 15


def test_a_value_beyond_float32_names_file_and_line(tmp_path):
    record = RECORD_1.replace("00:37,HR,77", "00:37,HR,1e39")  # finite as float64, inf as float32
    root = write_p12(tmp_path, {"132539": record, "132540": RECORD_2, "132541": RECORD_3})
    with pytest.raises(DataError, match=r"132539\.txt:10: value '1e39' of HR is beyond the float32 range"):
        load_physionet2012(root, sets=("a",))


def test_a_folder_holding_only_set_a_loads_with_sets_and_says_so_without(tmp_path):
    root = write_p12(tmp_path / "raw")
    with pytest.raises(DataError, match=r"set-b: set folder not found .* sets present \(a\), pass sets=\('a',\)"):
        load_dataset("physionet2012", root, cache_dir=None)
    table = load_dataset("physionet2012", root, cache_dir=tmp_path / "cache", sets=["a"])  # a list, as JSON gives
    assert table.name == "physionet2012-a" and len(table) == 3
    (entry,) = (tmp_path / "cache").iterdir()
    assert entry.name.startswith("physionet2012-a-v")  # the sets chosen are part of the cache key
