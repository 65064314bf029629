"""The MIMIC-IV loader on small tables in the database's exact CSV layout (v2.2+ column names)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from hymate.data import (
    MIMIC4_STATIC,
    MIMIC4_VARIABLES,
    DataError,
    LoadSummary,
    Mimic4Options,
    load_dataset,
    load_mimic4,
    mimic4_sites,
)
from hymate.data.mimic4 import MIMIC4_CHART_ITEMS, MIMIC4_LAB_ITEMS

MICU, CCU, SICU = (
    "Medical Intensive Care Unit (MICU)",
    "Coronary Care Unit (CCU)",
    "Surgical Intensive Care Unit (SICU)",
)
ICUSTAYS = f"""\
subject_id,hadm_id,stay_id,first_careunit,last_careunit,intime,outtime,los
10000980,26913865,39765666,{CCU},{CCU},2189-06-27 08:42:00,2189-06-30 08:42:00,3.0
10000032,29079034,39553978,{MICU},{MICU},2180-07-23 14:00:00,2180-07-26 14:00:00,3.0
10000032,29079035,39553979,{MICU},{MICU},2180-08-01 10:00:00,2180-08-01 20:00:00,0.4166666666666667
10001217,24597018,37067082,{SICU},{SICU},2157-11-20 19:18:02,,
"""
ADMISSIONS = """\
subject_id,hadm_id,admittime,dischtime,deathtime,admission_type,admit_provider_id,admission_location,discharge_location,insurance,language,marital_status,race,edregtime,edouttime,hospital_expire_flag
10000032,29079034,2180-07-23 12:35:00,2180-07-28 15:15:00,,EW EMER.,P49AFC,EMERGENCY ROOM,HOME,Medicaid,ENGLISH,WIDOWED,WHITE,2180-07-23 05:54:00,2180-07-23 14:00:00,0
10000032,29079035,2180-08-01 08:00:00,2180-08-02 12:00:00,,EW EMER.,P49AFC,EMERGENCY ROOM,HOME,Medicaid,ENGLISH,WIDOWED,WHITE,,,0
10000980,26913865,2189-06-27 07:38:00,2189-07-03 03:00:00,2189-07-03 03:00:00,EW EMER.,P30KEH,EMERGENCY ROOM,DIED,Medicaid,ENGLISH,MARRIED,BLACK/AFRICAN AMERICAN,2189-06-27 06:25:00,2189-06-27 08:42:00,1
10001217,24597018,2157-11-18 22:56:00,2157-11-25 18:00:00,,EW EMER.,P4645A,EMERGENCY ROOM,HOME HEALTH CARE,Other,?,MARRIED,WHITE,,,0
"""  # noqa: E501 - the real layout's long lines
PATIENTS = """\
subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod
10000032,F,52,2180,2014 - 2016,2180-09-09
10000980,M,73,2186,2008 - 2010,2189-07-03
10001217,F,55,2157,2011 - 2013,
"""
CHARTEVENTS = """\
subject_id,hadm_id,stay_id,caregiver_id,charttime,storetime,itemid,value,valuenum,valueuom,warning
10000032,29079034,39553978,95420,2180-07-23 13:00:00,2180-07-23 13:05:00,220045,90,90,bpm,0
10000032,29079034,39553978,95420,2180-07-23 15:00:00,2180-07-23 15:05:00,220045,88,88,bpm,0
10000032,29079034,39553978,95420,2180-07-23 15:00:00,2180-07-23 15:05:00,220179,120,120,mmHg,0
10000032,29079034,39553978,95420,2180-07-23 16:30:00,2180-07-23 16:35:00,223761,98.6,98.6,°F,0
10000032,29079034,39553978,95420,2180-07-23 17:00:00,2180-07-23 17:05:00,220048,SR (Sinus Rhythm),,,0
10000032,29079034,39553978,95420,2180-07-23 18:00:00,2180-07-23 18:05:00,220277,Unable,,%,0
10000032,29079034,39553978,95420,2180-07-25 14:00:00,2180-07-25 14:05:00,220045,100,100,bpm,0
10000032,29079034,39553978,95420,2180-07-25 14:00:01,2180-07-25 14:05:00,220045,101,101,bpm,0
10000032,29079035,39553979,95420,2180-08-01 11:00:00,2180-08-01 11:05:00,220045,70,70,bpm,0
10000980,26913865,39765666,12345,2189-06-27 09:42:00,2189-06-27 09:45:00,220210,18,18,insp/min,0
"""
LABEVENTS = """\
labevent_id,subject_id,hadm_id,specimen_id,itemid,order_provider_id,charttime,storetime,value,valuenum,valueuom,ref_range_lower,ref_range_upper,flag,priority,comments
1,10000032,,2001,50912,,2180-07-23 12:00:00,2180-07-23 13:00:00,1.0,1.0,mg/dL,0.4,1.1,,STAT,
2,10000032,,2002,50912,,2180-07-23 20:00:00,2180-07-23 21:00:00,1.2,1.2,mg/dL,0.4,1.1,abnormal,STAT,
3,10000032,29079034,2002,50813,,2180-07-23 20:00:00,2180-07-23 21:00:00,2.1,2.1,mmol/L,0.5,2,abnormal,STAT,
4,10000032,29079034,2002,51000,,2180-07-23 20:00:00,2180-07-23 21:00:00,150,150,mg/dL,0,150,,STAT,
5,10000032,29079034,2003,50983,,2180-07-24 02:00:00,2180-07-24 03:00:00,___,,mEq/L,133,145,,STAT,"HEMOLYZED, VALUE INVALID"
6,10000032,29079035,2004,50912,,2180-08-01 12:00:00,2180-08-01 13:00:00,0.9,0.9,mg/dL,0.4,1.1,,STAT,
7,10000980,26913865,2005,51301,,2189-06-28 08:42:00,2189-06-28 09:30:00,11.1,11.1,K/uL,4,11,abnormal,ROUTINE,
8,99999999,21111111,2006,50912,,2189-06-28 08:42:00,2189-06-28 09:30:00,3.0,3.0,mg/dL,0.4,1.1,abnormal,ROUTINE,
"""  # noqa: E501 - the real layout's long lines


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)


def write_mimic4(root: Path, **overrides: str | None) -> Path:
    """A MIMIC-IV folder; the event tables and admissions as .csv.gz, the rest as .csv."""
    tables = {
        "icu/icustays.csv": ICUSTAYS,
        "icu/chartevents.csv.gz": CHARTEVENTS,
        "hosp/labevents.csv.gz": LABEVENTS,
        "hosp/admissions.csv.gz": ADMISSIONS,
        "hosp/patients.csv": PATIENTS,
    }
    for name, text in tables.items():
        text = overrides.get(name.split("/")[1].split(".")[0], text)
        if text is not None:
            _write(root / name, text)
    return root


def test_parses_stays_labels_statics_and_window(tmp_path):
    summary = LoadSummary("mimic4")
    table = load_mimic4(write_mimic4(tmp_path), summary)

    assert table.name == "mimic4"
    assert table.variables == MIMIC4_VARIABLES and table.static_names == MIMIC4_STATIC == ("Age", "Gender")
    assert set(MIMIC4_CHART_ITEMS.values()) | set(MIMIC4_LAB_ITEMS.values()) == set(MIMIC4_VARIABLES)
    assert list(table.stay_ids) == ["39553978", "39765666"]  # stay_id order
    assert list(table.patient_ids) == ["10000032", "10000980"]
    assert list(table.sites) == [MICU, CCU]
    assert list(table.labels) == [0, 1] and table.labels.dtype == np.int8
    # age = anchor_age + year(intime) - anchor_year
    np.testing.assert_array_equal(table.static, np.array([[52, 0], [73 + 3, 1]], np.float32))

    times, ids, values = table.events(0)
    assert [table.variables[i - 1] for i in ids] == ["HR", "NISysABP", "Temp", "Creatinine", "Lactate", "HR"]
    np.testing.assert_allclose(times, [1, 1, 2.5, 6, 6, 48], rtol=1e-6)
    np.testing.assert_allclose(values, [88, 120, 37.0, 1.2, 2.1, 100], rtol=1e-5)  # 98.6 °F = 37 °C
    times, ids, values = table.events(1)
    assert [table.variables[i - 1] for i in ids] == ["RespRate", "WBC"]
    np.testing.assert_allclose(times, [1, 24], rtol=1e-6)
    np.testing.assert_allclose(values, [18, 11.1], rtol=1e-6)

    assert summary.stays == 2 and summary.events == 8
    assert summary.counts == {
        "excluded_missing_outtime": 1,  # 37067082
        "excluded_short_stay": 1,  # 39553979: 10 h < 48 h
        "chart_rows_not_in_vocabulary": 1,  # 220048 heart rhythm
        "chart_rows_before_intime": 1,
        "chart_rows_after_window": 1,  # one second after 48 h
        "chart_values_not_numeric": 1,  # SpO2 "Unable"
        "lab_rows_not_in_vocabulary": 1,  # 51000
        "lab_rows_outside_windows": 2,  # before intime; during the excluded short stay
        "lab_values_not_numeric": 1,  # sodium "___"
    }


def test_options_window_min_stay_and_sites(tmp_path):
    root = write_mimic4(tmp_path)
    summary = LoadSummary("mimic4")
    short = load_mimic4(root, summary, observation_hours=6)  # min stay follows: 39553979 kept
    assert list(short.stay_ids) == ["39553978", "39553979", "39765666"]
    assert short.times.max() <= 6
    times, ids, values = short.events(1)
    assert [short.variables[i - 1] for i in ids] == ["HR", "Creatinine"]
    np.testing.assert_allclose(times, [1, 2])
    assert summary.counts["lab_rows_outside_windows"] == 3  # before intime; sodium at 12 h; WBC at 24 h
    everyone = load_mimic4(root, min_stay_hours=0)
    assert len(everyone) == 3  # the stay without outtime is still excluded
    one = load_mimic4(root, sites=[CCU])
    assert list(one.stay_ids) == ["39765666"] and list(one.sites) == [CCU]
    assert mimic4_sites(root) == [CCU, MICU, SICU]


def test_chunked_reading_gives_the_same_table(tmp_path):
    root = write_mimic4(tmp_path)
    whole, chunked = LoadSummary("a"), LoadSummary("b")
    a = load_mimic4(root, whole)
    b = load_mimic4(root, chunked, chunk_rows=3)
    for name in ("stay_ids", "patient_ids", "sites", "labels", "static", "offsets", "times", "variable_ids", "values"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert whole.counts == chunked.counts


def test_missing_file_column_and_unknown_site(tmp_path):
    with pytest.raises(DataError, match=r"hosp/labevents\.csv\(\.gz\): table file not found"):
        load_mimic4(write_mimic4(tmp_path / "a", labevents=None))
    with pytest.raises(DataError, match=r"icu/chartevents\.csv\(\.gz\): table file not found"):
        load_mimic4(write_mimic4(tmp_path / "b", chartevents=None))
    root = write_mimic4(tmp_path / "c", icustays=ICUSTAYS.replace("first_careunit", "careunit"))
    with pytest.raises(DataError, match=r"icustays\.csv: missing column first_careunit"):
        load_mimic4(root)
    root = write_mimic4(tmp_path / "d", chartevents=CHARTEVENTS.replace(",valuenum,", ",value_num,"))
    with pytest.raises(DataError, match=r"chartevents\.csv\.gz: missing column valuenum"):
        load_mimic4(root)
    root = write_mimic4(tmp_path / "e")
    with pytest.raises(DataError) as err:
        load_mimic4(root, sites=["Neuro ICU"])
    assert "unknown first_careunit 'Neuro ICU'" in str(err.value)
    assert f"valid: {CCU}, {MICU}, {SICU}" in str(err.value)
    with pytest.raises(DataError, match="MIMIC-IV folder not found"):
        load_mimic4(tmp_path / "nowhere")


BAD = {
    "label not 0/1": (
        "admissions",
        ADMISSIONS.replace("2189-06-27 08:42:00,1\n", "2189-06-27 08:42:00,2\n"),
        ["admissions.csv.gz:4", "hospital_expire_flag '2'", "26913865", "not 0 or 1"],
    ),
    "admission missing": (
        "admissions",
        "\n".join(line for line in ADMISSIONS.splitlines() if "26913865" not in line) + "\n",
        ["admissions.csv.gz", "no row for hadm_id 26913865", "39765666"],
    ),
    "patient missing": (
        "patients",
        PATIENTS.replace("10000980,M", "10000981,M"),
        ["patients.csv", "no row for subject_id 10000980"],
    ),
    "malformed charttime": (
        "chartevents",
        CHARTEVENTS.replace("2180-07-23 16:30:00,2180", "23/07/2180 16:30,2180"),
        ["chartevents.csv.gz:5", "charttime", "'23/07/2180 16:30'"],
    ),
    "malformed intime": (
        "icustays",
        ICUSTAYS.replace("2189-06-27 08:42:00,", "yesterday,"),
        ["icustays.csv:2", "intime", "'yesterday'"],
    ),
    "non-numeric valuenum": (
        "labevents",
        LABEVENTS.replace(",2.1,2.1,", ",2.1,two,"),
        ["labevents.csv.gz:4", "valuenum", "'two'"],
    ),
    "empty stay_id": (
        "chartevents",
        CHARTEVENTS.replace("10000980,26913865,39765666,", "10000980,26913865,,"),
        ["chartevents.csv.gz:11", "stay_id", "missing"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_values_raise_dataerror_naming_file_and_problem(tmp_path, case):
    table, text, expected = BAD[case]
    with pytest.raises(DataError) as err:
        load_mimic4(write_mimic4(tmp_path, **{table: text}))
    for fragment in expected:
        assert fragment in str(err.value)


def test_options_are_validated():
    with pytest.raises(ValueError, match="observation_hours must be > 0"):
        Mimic4Options(observation_hours=-1)
    with pytest.raises(ValueError, match="sites must be a sequence"):
        Mimic4Options(sites=MICU)
    with pytest.raises(ValueError, match="chunk_rows"):
        Mimic4Options(chunk_rows=0)
    assert Mimic4Options().cache_key == "mimic4-w48-m48-sall-v1"
    assert Mimic4Options(observation_hours=24).cache_key == "mimic4-w24-m24-sall-v1"
    assert Mimic4Options(chunk_rows=5).cache_key == Mimic4Options().cache_key


def test_load_dataset_dispatch_and_cache_per_window(tmp_path):
    root = write_mimic4(tmp_path / "raw")
    cache = tmp_path / "cache"
    first = load_dataset("mimic4", root, cache_dir=cache)
    summary = LoadSummary("mimic4")
    again = load_dataset("mimic4", root, cache_dir=cache, summary=summary)
    np.testing.assert_array_equal(again.values, first.values)
    assert list(again.sites) == list(first.sites)
    assert summary.counts["excluded_short_stay"] == 1  # the summary survives the cache
    day = load_dataset("mimic4", root, cache_dir=cache, observation_hours=24)
    assert day.times.max() <= 24
    assert sorted(p.name.rsplit("-", 2)[0] for p in cache.iterdir()) == [
        "mimic4-w24-m24-sall-v1",
        "mimic4-w48-m48-sall-v1",
    ]


def test_every_missing_table_is_named_at_once(tmp_path):
    root = write_mimic4(tmp_path, chartevents=None, admissions=None, patients=None)
    with pytest.raises(DataError) as err:
        load_mimic4(root)
    assert str(err.value).split("; ") == [
        f"{root / 'icu' / 'chartevents'}.csv(.gz): table file not found",
        f"{root / 'hosp' / 'admissions'}.csv(.gz): table file not found",
        f"{root / 'hosp' / 'patients'}.csv(.gz): table file not found",
    ]


def test_a_header_only_event_table_is_counted(tmp_path):
    root = write_mimic4(tmp_path, labevents=LABEVENTS.splitlines()[0] + "\n")
    summary = LoadSummary("mimic4")
    table = load_mimic4(root, summary)
    assert summary.counts["empty_table_labevents"] == 1 and len(table) > 0
