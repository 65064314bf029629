"""The eICU-CRD loader on small tables in the database's exact CSV layout (v2.0 column names)."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pytest

from hymate.data import (
    EICU_STATIC,
    EICU_VARIABLES,
    MIMIC4_VARIABLES,
    DataError,
    EicuOptions,
    LoadSummary,
    eicu_sites,
    load_dataset,
    load_eicu,
)

# patient.csv with all 29 columns of eICU-CRD v2.0, in order.
PATIENT = """\
patientunitstayid,patienthealthsystemstayid,gender,age,ethnicity,hospitalid,wardid,apacheadmissiondx,admissionheight,hospitaladmittime24,hospitaladmitoffset,hospitaladmitsource,hospitaldischargeyear,hospitaldischargetime24,hospitaldischargeoffset,hospitaldischargelocation,hospitaldischargestatus,unittype,unitadmittime24,unitadmitsource,unitvisitnumber,unitstaytype,admissionweight,dischargeweight,unitdischargetime24,unitdischargeoffset,unitdischargelocation,unitdischargestatus,uniquepid
141765,129392,Male,> 89,Caucasian,59,91,"Sepsis, pulmonary",170.2,22:10:00,-120,Emergency Department,2015,03:00:00,3100,Death,Expired,Med-Surg ICU,00:10:00,Emergency Department,1,admit,80.3,,00:30:00,2900,Death,Expired,002-1039
141764,129391,Female,87,Caucasian,59,91,"Rhythm disturbance (atrial, supraventricular)",157.5,23:36:00,-14,Emergency Department,2015,20:48:00,3400,Home,Alive,Med-Surg ICU,23:50:00,Emergency Department,1,admit,61.7,60.4,01:50:00,3000,Floor,Alive,002-1039
141766,129393,Male,,Caucasian,73,95,CHF,,08:00:00,0,Direct Admit,2014,09:00:00,1000,Death,Expired,CCU-CTICU,08:00:00,Direct Admit,1,admit,,,00:40:00,1000,Death,Expired,002-2000
141767,129394,Unknown,45,,73,95,Overdose,165,08:00:00,0,Direct Admit,2014,,,,,MICU,08:00:00,Direct Admit,1,admit,70,,08:00:00,3000,Floor,Alive,002-3000
141768,129395,Female,60,Hispanic,73,95,CABG,160,08:00:00,-30,Operating Room,2014,12:00:00,9000,Home,Alive,CSICU,08:30:00,Operating Room,1,admit,72.5,71,11:30:00,4000,Floor,Alive,002-4000
"""  # noqa: E501 - the real layout's long lines
VITAL_PERIODIC = """\
vitalperiodicid,patientunitstayid,observationoffset,temperature,sao2,heartrate,respiration,cvp,etco2,systemicsystolic,systemicdiastolic,systemicmean,pasystolic,padiastolic,pamean,st1,st2,st3,icp
1,141764,-5,,,79,,,,,,,,,,,,,
2,141764,5,,97,80,,,,,,,,,,,,,
3,141764,10,,,82,,,,,,,,,,,,,
4,141764,65,37.2,,90,,,,120,,,,,,,,,
5,141764,2880,,,100,,,,,,,,,,,,,
6,141764,2885,,,101,,,,,,,,,,,,,
7,141765,30,,,110,22,,,,,,,,,,,,
8,141766,30,,,130,,,,,,,,,,,,,
9,999999,30,,,60,,,,,,,,,,,,,
"""
VITAL_APERIODIC = """\
vitalaperiodicid,patientunitstayid,observationoffset,noninvasivesystolic,noninvasivediastolic,noninvasivemean,paop,cardiacoutput,cardiacinput,svr,svri,pvr,pvri
1,141764,15,130,70,90,,,,,,,
"""
LAB = """\
labid,patientunitstayid,labresultoffset,labtypeid,labname,labresult,labresulttext,labmeasurenamesystem,labmeasurenameinterface,labresultrevisedoffset
1,141764,-60,1,creatinine,1.1,1.1,mg/dL,mg/dL,-50
2,141764,120,1,creatinine,1.3,1.3,mg/dL,mg/dL,130
3,141764,120,1,sodium,140,140,mmol/L,mmol/L,130
4,141764,180,7,troponin - I,0.05,0.05,ng/mL,ng/mL,190
5,141764,240,1,lactate,,<0.5,mmol/L,mmol/L,250
6,141764,3000,1,BUN,20,20,mg/dL,mg/dL,3010
7,141765,60,3,WBC x 1000,12.5,12.5,K/mcL,K/mcL,70
8,141765,60,4,bedside glucose,150,150,mg/dL,mg/dL,70
"""


def write_eicu(root: Path, **overrides: str | None) -> Path:
    """An eICU folder; patient and lab as .csv.gz, the vitals as plain .csv (both occur)."""
    tables = {
        "patient.csv.gz": PATIENT,
        "vitalPeriodic.csv": VITAL_PERIODIC,
        "vitalAperiodic.csv": VITAL_APERIODIC,
        "lab.csv.gz": LAB,
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, text in tables.items():
        text = overrides.get(name.split(".")[0], text)
        if text is None:
            continue
        if name.endswith(".gz"):
            with gzip.open(root / name, "wt") as f:
                f.write(text)
        else:
            (root / name).write_text(text)
    return root


def vid(name: str) -> int:
    return EICU_VARIABLES.index(name) + 1


def test_parses_stays_labels_statics_and_window(tmp_path):
    summary = LoadSummary("eicu")
    table = load_eicu(write_eicu(tmp_path), summary)

    assert table.name == "eicu"
    assert table.variables == EICU_VARIABLES == MIMIC4_VARIABLES  # shared ids across sources
    assert table.static_names == EICU_STATIC == ("Age", "Gender", "Height", "Weight", "HospAdmTime")
    assert list(table.stay_ids) == ["141764", "141765", "141768"]  # sorted by patientunitstayid
    assert list(table.patient_ids) == ["002-1039", "002-1039", "002-4000"]
    assert list(table.sites) == ["59", "59", "73"]
    assert list(table.labels) == [0, 1, 0] and table.labels.dtype == np.int8
    np.testing.assert_allclose(
        table.static,
        np.array([[87, 0, 157.5, 61.7, -14 / 60], [90, 1, 170.2, 80.3, -2], [60, 0, 160, 72.5, -0.5]]),
        rtol=1e-6,
    )
    assert not np.isnan(table.static).any()

    times, ids, values = table.events(0)
    np.testing.assert_allclose(
        times, [5 / 60, 5 / 60, 0.25, 0.25, 0.25, 65 / 60, 65 / 60, 65 / 60, 2, 2, 48], rtol=1e-6
    )
    names = [table.variables[i - 1] for i in ids]
    assert names == ["HR", "SpO2", "NISysABP", "NIDiasABP", "NIMAP", "HR", "Temp", "SysABP", "Creatinine", "Na", "HR"]
    np.testing.assert_allclose(values, [80, 97, 130, 70, 90, 90, 37.2, 120, 1.3, 140, 100], rtol=1e-6)
    times, ids, values = table.events(1)
    assert [table.variables[i - 1] for i in ids] == ["HR", "RespRate", "Glucose", "WBC"]
    np.testing.assert_allclose(times, [0.5, 0.5, 1, 1])
    np.testing.assert_allclose(values, [110, 22, 150, 12.5], rtol=1e-6)
    assert table.lengths[2] == 0

    assert summary.stays == 3 and summary.events == 15
    assert summary.counts == {
        "excluded_missing_discharge_status": 1,  # 141767
        "excluded_short_stay": 1,  # 141766: 1000 min < 48 h
        "age_over_89": 1,
        "vital_rows_before_admission": 1,
        "vital_rows_after_window": 1,
        "vital_values_thinned": 1,  # HR at 10 min, same hour as HR at 5 min
        "lab_rows_before_admission": 1,
        "lab_rows_after_window": 1,
        "lab_rows_not_in_vocabulary": 1,  # troponin - I
        "lab_values_not_numeric": 1,  # lactate "<0.5"
        "stays_without_events": 1,
    }


def test_options_window_thinning_min_stay_and_sites(tmp_path):
    root = write_eicu(tmp_path)
    every_row = load_eicu(root, vital_interval_minutes=0)
    assert every_row.n_events == 16  # HR at 10 minutes kept
    short = load_eicu(root, observation_hours=1)  # min stay follows the window: 141766 kept
    assert list(short.stay_ids) == ["141764", "141765", "141766", "141768"]
    assert short.times.max() <= 1
    assert list(short.labels) == [0, 1, 1, 0]
    assert np.isnan(short.static[2, 0])  # empty age
    everyone = load_eicu(root, min_stay_hours=0)
    assert "141766" in set(everyone.stay_ids)
    summary = LoadSummary("eicu")
    one = load_eicu(root, summary, sites=[73])
    assert list(one.stay_ids) == ["141768"] and list(one.sites) == ["73"]
    assert summary.counts["excluded_short_stay"] == 1 and "vital_values_thinned" not in summary.counts
    assert eicu_sites(root) == ["59", "73"]


def test_chunked_reading_gives_the_same_table(tmp_path):
    root = write_eicu(tmp_path)
    whole, chunked = LoadSummary("a"), LoadSummary("b")
    a = load_eicu(root, whole)
    b = load_eicu(root, chunked, chunk_rows=2)  # thinning must also work across chunks
    for name in ("stay_ids", "patient_ids", "sites", "labels", "offsets", "times", "variable_ids", "values"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(a.static, b.static)
    assert whole.counts == chunked.counts


def test_missing_aperiodic_table_is_counted(tmp_path):
    summary = LoadSummary("eicu")
    table = load_eicu(write_eicu(tmp_path, vitalAperiodic=None), summary)
    assert summary.counts["vitalaperiodic_table_absent"] == 1
    assert vid("NISysABP") not in set(table.variable_ids.tolist())


def test_nan_and_null_text_mean_missing(tmp_path):
    root = write_eicu(
        tmp_path, vitalPeriodic=VITAL_PERIODIC.replace("7,141765,30,,,110,22", "7,141765,30,NULL,NaN,110,22")
    )
    assert load_eicu(root).n_events == 15


def test_lowercase_file_names_are_found(tmp_path):
    root = write_eicu(tmp_path)
    (root / "vitalPeriodic.csv").rename(root / "vitalperiodic.csv")
    assert load_eicu(root).n_events == 15


def test_missing_file_column_and_unknown_site(tmp_path):
    root = write_eicu(tmp_path / "a", lab=None)
    with pytest.raises(DataError, match=r"lab\.csv\(\.gz\): table file not found"):
        load_eicu(root)
    root = write_eicu(tmp_path / "b", patient=PATIENT.replace("hospitaldischargestatus", "dischargestatus"))
    with pytest.raises(DataError, match=r"patient\.csv\.gz: missing column hospitaldischargestatus"):
        load_eicu(root)
    root = write_eicu(tmp_path / "c", lab=LAB.replace("labresult,", "result,", 1))
    with pytest.raises(DataError, match=r"lab\.csv\.gz: missing column labresult \(found: labid"):
        load_eicu(root)
    root = write_eicu(tmp_path / "d")
    with pytest.raises(DataError, match=r"patient\.csv\.gz: unknown hospitalid '999'; valid: 59, 73"):
        load_eicu(root, sites=["999", "59"])
    with pytest.raises(DataError, match="eICU folder not found"):
        load_eicu(tmp_path / "nowhere")


BAD = {
    "discharge status": (
        "patient",
        PATIENT.replace("Death,Expired,Med", "Death,Dead,Med"),
        ["patient.csv.gz:2", "'Dead'", "141765"],
    ),
    "non-numeric vital": (
        "vitalPeriodic",
        VITAL_PERIODIC.replace(",82,", ",fast,"),
        ["vitalPeriodic.csv:4", "heartrate", "'fast'"],
    ),
    "infinite vital": (
        "vitalPeriodic",
        VITAL_PERIODIC.replace(",82,", ",inf,"),
        ["vitalPeriodic.csv:4", "heartrate", "'inf'", "finite"],
    ),
    "missing offset": (
        "lab",
        LAB.replace("141764,120,1,sodium", "141764,,1,sodium"),
        ["lab.csv.gz:4", "labresultoffset", "missing"],
    ),
    "non-integer stay id": (
        "vitalPeriodic",
        VITAL_PERIODIC.replace("7,141765", "7,x141765"),
        ["vitalPeriodic.csv:8", "patientunitstayid", "'x141765'"],
    ),
    "bad age": ("patient", PATIENT.replace("Female,87,", "Female,eighty,"), ["patient.csv.gz:3", "age", "'eighty'"]),
    "duplicate stay": (
        "patient",
        PATIENT + PATIENT.splitlines()[5] + "\n",
        ["patient.csv.gz:7", "141768 listed twice"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_values_raise_dataerror_naming_file_line_and_column(tmp_path, case):
    table, text, expected = BAD[case]
    root = write_eicu(tmp_path, **{table: text})
    with pytest.raises(DataError) as err:
        load_eicu(root)
    for fragment in expected:
        assert fragment in str(err.value)


def test_options_are_validated():
    with pytest.raises(ValueError, match="observation_hours must be > 0"):
        EicuOptions(observation_hours=0)
    with pytest.raises(ValueError, match="sites must be a sequence"):
        EicuOptions(sites="59")
    with pytest.raises(ValueError, match="vital_interval_minutes"):
        EicuOptions(vital_interval_minutes=-5)
    assert EicuOptions().cache_key == "eicu-w48-m48-i60-sall-v1"
    assert EicuOptions(chunk_rows=10).cache_key == EicuOptions().cache_key  # memory only
    assert EicuOptions(sites=[59]).cache_key == EicuOptions(sites=("59",)).cache_key != EicuOptions().cache_key


def test_load_dataset_dispatch_and_cache_per_window(tmp_path):
    root = write_eicu(tmp_path / "raw")
    cache = tmp_path / "cache"
    first = load_dataset("eicu", root, cache_dir=cache)
    summary = LoadSummary("eicu")
    again = load_dataset("eicu", root, cache_dir=cache, summary=summary)
    np.testing.assert_array_equal(again.values, first.values)
    assert list(again.stay_ids) == list(first.stay_ids)
    assert summary.counts["age_over_89"] == 1  # the summary survives the cache
    day = load_dataset("eicu", root, cache_dir=cache, observation_hours=24)
    assert day.times.max() <= 24 and len(day) == 3
    assert len(list(cache.iterdir())) == 2


def test_every_missing_table_is_named_at_once(tmp_path):
    root = write_eicu(tmp_path, patient=None, lab=None)
    with pytest.raises(DataError) as err:
        load_eicu(root)
    assert str(err.value) == (
        f"{root / 'patient'}.csv(.gz): table file not found; {root / 'lab'}.csv(.gz): table file not found"
    )


def test_a_truncated_compressed_table_names_the_file(tmp_path):
    rows = "".join(f"{9 + i},141764,{i % 2880},1,sodium,{130 + i % 17},x,mmol/L,mmol/L,0\n" for i in range(200_000))
    root = write_eicu(tmp_path, lab=LAB + rows)  # large enough that the header is read before the cut
    data = (root / "lab.csv.gz").read_bytes()
    (root / "lab.csv.gz").write_bytes(data[: len(data) // 2])  # the rest of the stream is cut off
    with pytest.raises(DataError, match=r"lab\.csv\.gz: truncated or corrupt file, unreadable after line \d+ \("):
        load_eicu(root)


def test_a_value_beyond_float32_names_file_line_and_column(tmp_path):
    root = write_eicu(tmp_path, vitalPeriodic=VITAL_PERIODIC.replace(",82,", ",1e39,"))
    with pytest.raises(DataError, match=r"vitalPeriodic\.csv:4: column heartrate value '1e39' is not a finite number"):
        load_eicu(root)
    root = write_eicu(tmp_path / "static", patient=PATIENT.replace(",157.5,", ",-4e38,"))
    with pytest.raises(DataError, match=r"patient\.csv\.gz:3: column admissionheight value '-4e38'"):
        load_eicu(root)


def test_a_header_only_table_is_counted_and_warned_about(tmp_path, caplog):
    root = write_eicu(tmp_path, lab=LAB.splitlines()[0] + "\n")
    summary = LoadSummary("eicu")
    with caplog.at_level(logging.WARNING):
        table = load_eicu(root, summary)
    assert summary.counts["empty_table_lab"] == 1 and "empty_table_lab: 1" in str(summary)
    assert "lab.csv.gz: the table has a header but no rows" in caplog.text
    assert len(table) == 3


def test_a_dataset_with_no_stay_left_is_a_data_error_naming_the_folder(tmp_path):
    root = write_eicu(tmp_path)
    with pytest.raises(DataError) as err:
        load_dataset("eicu", root, cache_dir=None, min_stay_hours=1000)
    assert str(err.value).startswith(f"{root}: eicu has no stays left after its exclusions (eicu: 0 stays, 0 events (")
    assert "excluded_" in str(err.value)
    root = write_eicu(tmp_path / "empty", patient=PATIENT.splitlines()[0] + "\n")
    with pytest.raises(DataError, match=r"no stays left .*empty_table_patient: 1"):
        load_dataset("eicu", root, cache_dir=None)
