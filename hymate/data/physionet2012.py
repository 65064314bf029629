"""Loader for the PhysioNet/CinC Challenge 2012 data in its own published layout.

Layout read (DESIGN.md section 2, ../shared/data/README.md)::

    root/set-a/<RecordID>.txt   CSV "Time,Parameter,Value", Time "HH:MM" since ICU admission
    root/Outcomes-a.txt         RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death
    (the same for sets b and c)

What each record becomes (one record is one ICU stay of one patient):

- ``stay_id`` and ``patient_id`` are the RecordID; ``label`` is ``In-hospital_death``.
- ``site`` is the ICU type, the dataset's natural split into four units:
  ``ICU_SITES`` maps 1..4 to "coronary_care", "cardiac_surgery", "medical", "surgical";
  a record whose ICUType is absent or -1 gets site "unknown" (counted as
  ``missing_icutype``; none in the real data). Any other ICUType value is an error.
- ``static`` holds Age, Gender, Height, ICUType, Weight, read from their rows at 00:00; -1
  (the challenge's "unknown") becomes NaN. Only the first Weight at 00:00 is the admission
  weight; every later Weight row (a second one at 00:00 included; two records have one) is
  an event of the time-series variable "Weight". Static descriptors after 00:00 (none in
  the real data) are skipped and counted as ``static_after_admission_rows``.
- The 37 time-series parameters, in the fixed order ``PHYSIONET2012_VARIABLES`` (variable
  id k is ``PHYSIONET2012_VARIABLES[k - 1]``), become events with times in hours.

Odd but valid input is handled deliberately and counted in the LoadSummary:

- ``stays_without_events``: records with no time-series row at all (12 in the real data).
  They are kept with zero events; the model handles empty sequences and dropping them would
  silently change the challenge's cohort.
- ``empty_parameter_rows``: rows whose Parameter is empty (2,403 in set-c); skipped.
- ``unknown_parameter_rows``: a parameter outside the vocabulary; skipped, with one warning
  per name.
- ``minus_one_values_dropped``: time-series values of exactly -1. The challenge uses -1 for
  "unknown" and no time-series variable can be -1 physically; in the real data they occur
  only in NIDiasABP (167) and DiasABP (57), so they are dropped as missing rather than
  kept as a measured diastolic pressure of -1 mmHg. Other implausible values are kept as
  measured (e.g. Temp -17.8, which is 0 °F converted, and zeros in Urine/ABP/Weight):
  deciding what is an artefact is modelling, and the normaliser clips wild z-scores.
- ``outcomes_without_record``: outcome rows whose record file is absent (a partial copy).

Everything else that is wrong raises :class:`DataError` naming the file, line and problem:
a missing or wrong header, a row without three fields, a malformed time, a non-numeric or
non-finite value (or one beyond float32, the type values are stored in), a record without a
RecordID row, a record the outcomes file does not cover, a label that is not 0/1, a missing
set folder (naming the sets present, to load only those) or outcomes file.

Parsing is a plain line parser: about 4-5 s for all 12,000 files on one core (one
``pandas.read_csv`` per file: 38 s). A 2-process pool measured 3.5 s against 5.3 s, not worth
its complexity because :func:`hymate.data.load_dataset` parses once and then reads a parquet
cache (about 0.4 s).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .stays import DataError, LoadSummary, StayRecord, StayTable, concat_tables, table_from_stays

logger = logging.getLogger(__name__)

# Bump when the parser's output changes, so parquet caches of older parses are not reused.
PARSER_VERSION = 1

PHYSIONET2012_SETS: tuple[str, ...] = ("a", "b", "c")

PHYSIONET2012_VARIABLES: tuple[str, ...] = (
    "ALP", "ALT", "AST", "Albumin", "BUN", "Bilirubin", "Cholesterol", "Creatinine",
    "DiasABP", "FiO2", "GCS", "Glucose", "HCO3", "HCT", "HR", "K", "Lactate", "MAP",
    "MechVent", "Mg", "NIDiasABP", "NIMAP", "NISysABP", "Na", "PaCO2", "PaO2", "Platelets",
    "RespRate", "SaO2", "SysABP", "Temp", "TroponinI", "TroponinT", "Urine", "WBC", "Weight",
    "pH",
)  # fmt: skip

PHYSIONET2012_STATIC: tuple[str, ...] = ("Age", "Gender", "Height", "ICUType", "Weight")

ICU_SITES: dict[int, str] = {
    1: "coronary_care",
    2: "cardiac_surgery",
    3: "medical",
    4: "surgical",
}
UNKNOWN_SITE = "unknown"

HEADER = "Time,Parameter,Value"
LABEL_COLUMN = "In-hospital_death"
ID_COLUMN = "RecordID"

_VOCAB = {name: i + 1 for i, name in enumerate(PHYSIONET2012_VARIABLES)}
_STATIC_INDEX = {name: i for i, name in enumerate(PHYSIONET2012_STATIC)}
_WEIGHT_STATIC = _STATIC_INDEX["Weight"]
_WEIGHT_ID = _VOCAB["Weight"]
_ICUTYPE_STATIC = _STATIC_INDEX["ICUType"]
_FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max; values are stored as float32


@dataclass
class _Record:
    """One parsed record file, before its label is joined from the outcomes file."""

    record_id: str
    static: list[float]
    times: list[float] = field(default_factory=list)
    variable_ids: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


def _parse_time(text: str, where: str) -> float:
    """'HH:MM' -> hours; raise DataError for anything else."""
    hh, sep, mm = text.partition(":")
    if not (sep and hh.isdigit() and mm.isdigit() and len(mm) == 2 and int(mm) < 60):
        raise DataError(f"{where}: malformed time {text!r} (expected HH:MM)")
    return int(hh) + int(mm) / 60.0


def parse_record(
    path: Path,
    summary: LoadSummary,
    time_cache: dict[str, float] | None = None,
    warned: set[str] | None = None,
) -> _Record:
    """Parse one record file; odd rows are counted in ``summary``, bad ones raise DataError.

    ``time_cache`` memoises 'HH:MM' -> hours across files (fewer than 3,000 distinct times);
    ``warned`` holds the unknown parameter names already warned about.
    """
    time_cache = {} if time_cache is None else time_cache
    warned = set() if warned is None else warned
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read record file ({exc})") from exc
    lines = text.splitlines()
    if not lines or lines[0].strip() != HEADER:
        found = lines[0][:60] if lines else "an empty file"
        raise DataError(f"{path}:1: missing or wrong header: expected {HEADER!r}, found {found!r}")

    static = [math.nan] * len(PHYSIONET2012_STATIC)
    record_id: str | None = None
    times: list[float] = []
    variable_ids: list[int] = []
    values: list[float] = []
    vocab_get = _VOCAB.get
    isfinite = math.isfinite
    seen_weight = False
    n_static_late = n_empty = n_unknown = n_minus_one = 0

    for lineno, line in enumerate(lines[1:], start=2):
        parts = line.split(",")
        if len(parts) != 3:
            if not line.strip():
                continue  # a blank line (e.g. at the end) carries nothing
            raise DataError(
                f"{path}:{lineno}: expected 3 comma-separated fields "
                f"(Time,Parameter,Value), found {len(parts)} in {line!r}"
            )
        time_text, name, value_text = parts
        hours = time_cache.get(time_text)
        if hours is None:
            hours = time_cache[time_text] = _parse_time(time_text, f"{path}:{lineno}")
        try:
            value = float(value_text)
        except ValueError:
            raise DataError(f"{path}:{lineno}: value {value_text!r} of {name or 'the row'} is not a number") from None
        if not isfinite(value):
            raise DataError(f"{path}:{lineno}: value {value_text!r} of {name} is not finite")
        if abs(value) > _FLOAT32_MAX:
            raise DataError(
                f"{path}:{lineno}: value {value_text!r} of {name} is beyond the float32 range "
                f"(|x| <= {_FLOAT32_MAX:.3g}) that values are stored in"
            )

        var_id = vocab_get(name)
        if var_id is not None and (var_id != _WEIGHT_ID or seen_weight or hours != 0.0):
            if value == -1.0:
                n_minus_one += 1
                continue
            times.append(hours)
            variable_ids.append(var_id)
            values.append(value)
            continue
        if var_id == _WEIGHT_ID:  # the first Weight at 00:00 is the admission weight
            seen_weight = True
            static[_WEIGHT_STATIC] = math.nan if value == -1.0 else value
            continue
        if name == ID_COLUMN:
            if record_id is not None:
                raise DataError(f"{path}:{lineno}: second RecordID row ({value_text})")
            if not value.is_integer():
                raise DataError(f"{path}:{lineno}: RecordID {value_text!r} is not an integer")
            record_id = str(int(value))
            continue
        static_index = _STATIC_INDEX.get(name)
        if static_index is not None:
            if hours != 0.0:
                n_static_late += 1
            elif math.isnan(static[static_index]):
                static[static_index] = math.nan if value == -1.0 else value
            continue
        if not name:
            n_empty += 1
            continue
        n_unknown += 1
        if name not in warned:
            warned.add(name)
            logger.warning("%s:%d: unknown parameter %r skipped (and any later rows of it)", path, lineno, name)

    if record_id is None:
        raise DataError(f"{path}: no RecordID row (expected '00:00,RecordID,<id>')")
    icu_type = static[_ICUTYPE_STATIC]
    if not math.isnan(icu_type) and icu_type not in ICU_SITES:
        raise DataError(f"{path}: ICUType {icu_type:g} is not one of 1-4 or -1 (unknown)")

    for what, n in (
        ("static_after_admission_rows", n_static_late),
        ("empty_parameter_rows", n_empty),
        ("unknown_parameter_rows", n_unknown),
        ("minus_one_values_dropped", n_minus_one),
    ):
        if n:
            summary.count(what, n)
    return _Record(record_id, static, times, variable_ids, values)


def read_outcomes(path: Path) -> dict[str, int]:
    """RecordID -> In-hospital_death (0/1) from an ``Outcomes-<set>.txt`` file."""
    if not path.is_file():
        raise DataError(f"{path}: outcomes file not found (expected Outcomes-<set>.txt)")
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    header = lines[0].strip().split(",") if lines else []
    if ID_COLUMN not in header or LABEL_COLUMN not in header:
        raise DataError(
            f"{path}:1: missing or wrong header: expected columns {ID_COLUMN} and {LABEL_COLUMN}, "
            f"found {lines[0][:80] if lines else 'an empty file'!r}"
        )
    id_col, label_col = header.index(ID_COLUMN), header.index(LABEL_COLUMN)
    labels: dict[str, int] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.strip().split(",")
        if len(parts) != len(header):
            raise DataError(f"{path}:{lineno}: expected {len(header)} fields, found {len(parts)}")
        record_id, label = parts[id_col].strip(), parts[label_col].strip()
        if not record_id.isdigit():
            raise DataError(f"{path}:{lineno}: RecordID {record_id!r} is not an integer")
        record_id = str(int(record_id))
        if label not in ("0", "1"):
            raise DataError(f"{path}:{lineno}: {LABEL_COLUMN} of record {record_id} is {label!r}, expected 0 or 1")
        if record_id in labels:
            raise DataError(f"{path}:{lineno}: record {record_id} listed twice")
        labels[record_id] = int(label)
    return labels


def _check_sets(sets: Iterable[str]) -> tuple[str, ...]:
    sets = tuple(sets)
    bad = [s for s in sets if s not in PHYSIONET2012_SETS]
    if bad or not sets:
        raise ValueError(f"PhysioNet 2012 sets must be among {PHYSIONET2012_SETS}, got {sets}")
    if len(set(sets)) != len(sets):
        raise ValueError(f"PhysioNet 2012 sets listed twice: {sets}")
    return sets


def table_name(sets: Sequence[str]) -> str:
    """'physionet2012' for all three sets, else e.g. 'physionet2012-a' or 'physionet2012-bc'."""
    sets = _check_sets(sets)
    return "physionet2012" if sorted(sets) == list(PHYSIONET2012_SETS) else ("physionet2012-" + "".join(sets))


def _load_set(
    root: Path, set_name: str, summary: LoadSummary, time_cache: dict[str, float], warned: set[str]
) -> StayTable:
    folder = root / f"set-{set_name}"
    if not folder.is_dir():
        present = [s for s in PHYSIONET2012_SETS if (root / f"set-{s}").is_dir()]
        raise DataError(
            f"{folder}: set folder not found (PhysioNet 2012 layout: set-{set_name}/*.txt "
            f"and Outcomes-{set_name}.txt under {root}); to load only the sets present "
            f"({', '.join(present) or 'none'}), pass sets=({', '.join(map(repr, present))},) "
            f"or hymate-sim --sets {','.join(present) or 'a'}"
        )
    outcomes_path = root / f"Outcomes-{set_name}.txt"
    labels = read_outcomes(outcomes_path)
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise DataError(f"{folder}: no record files (*.txt)")

    stays: list[StayRecord] = []
    file_of: dict[str, Path] = {}
    for path in files:
        record = parse_record(path, summary, time_cache, warned)
        if record.record_id in file_of:
            raise DataError(f"{path}: RecordID {record.record_id} already read from {file_of[record.record_id]}")
        file_of[record.record_id] = path
        label = labels.pop(record.record_id, None)
        if label is None:
            raise DataError(f"{outcomes_path}: no outcome for record {record.record_id} (file {path})")
        icu_type = record.static[_ICUTYPE_STATIC]
        if math.isnan(icu_type):
            summary.count("missing_icutype")
            site = UNKNOWN_SITE
        else:
            site = ICU_SITES[int(icu_type)]
        if not record.times:
            summary.count("stays_without_events")
        stays.append(
            StayRecord(
                stay_id=record.record_id,
                patient_id=record.record_id,
                site=site,
                label=label,
                static=record.static,
                times=record.times,
                variable_ids=record.variable_ids,
                values=record.values,
            )
        )
    if labels:
        summary.count("outcomes_without_record", len(labels))
        logger.warning(
            "%s: %d outcome rows have no record file in %s (e.g. %s)",
            outcomes_path,
            len(labels),
            folder,
            next(iter(labels)),
        )
    return table_from_stays(f"physionet2012-{set_name}", PHYSIONET2012_VARIABLES, PHYSIONET2012_STATIC, stays)


def load_physionet2012_by_set(
    root: str | Path,
    sets: Sequence[str] = PHYSIONET2012_SETS,
    summary: LoadSummary | None = None,
) -> dict[str, StayTable]:
    """One table per set ("a", "b", "c"), e.g. to test on set-a and train on b+c."""
    root = Path(root)
    sets = _check_sets(sets)
    if not root.is_dir():
        raise DataError(f"{root}: PhysioNet 2012 folder not found")
    summary = summary if summary is not None else LoadSummary(source=table_name(sets))
    time_cache: dict[str, float] = {}
    warned: set[str] = set()
    tables = {s: _load_set(root, s, summary, time_cache, warned) for s in sets}
    ids = [i for t in tables.values() for i in t.stay_ids]
    if len(set(ids)) != len(ids):
        raise DataError(f"{root}: a RecordID occurs in more than one of the sets {sets}")
    summary.stays += sum(len(t) for t in tables.values())
    summary.events += sum(t.n_events for t in tables.values())
    logger.info("%s", summary)
    return tables


def load_physionet2012(
    root: str | Path,
    sets: Sequence[str] = PHYSIONET2012_SETS,
    summary: LoadSummary | None = None,
) -> StayTable:
    """All stays of the given sets in one table (set order, then RecordID order).

    The challenge's own evaluation trains on some sets and tests on another; load them
    separately for that (``load_physionet2012(root, ("b", "c"))`` and
    ``load_physionet2012(root, ("a",))``) or use :func:`load_physionet2012_by_set`.
    """
    sets = _check_sets(sets)
    tables = load_physionet2012_by_set(root, sets, summary)
    return concat_tables([tables[s] for s in sets], name=table_name(sets))
