"""Loader for the PhysioNet/CinC Challenge 2019 (early sepsis prediction) in its own layout.

Layout read (DESIGN.md section 2, ../shared/data/README.md)::

    root/training_setA/p0XXXXX.psv   hospital A (20,336 patients)
    root/training_setB/p1XXXXX.psv   hospital B (20,000 patients)

A file is pipe-separated with a fixed 41-column header: 34 vitals and labs (``HR`` ...
``Platelets``), ``Age``, ``Gender``, ``Unit1``, ``Unit2``, ``HospAdmTime``, ``ICULOS`` and
``SepsisLabel``; one row per ICU hour, missing values are the text ``NaN``. ``ICULOS`` is
the row's hour since ICU admission (1 is the first hour; a record may start later).

Task: sepsis onset after the observation window, predicted from the window
-------------------------------------------------------------------------

With ``observation_hours`` W (default 24) and ``gap_hours`` G (default 0):

- **Inputs** are the rows with ``ICULOS <= W``: every measured (non-NaN) value of the 34
  vitals/labs becomes an event at time ``ICULOS`` hours. Nothing after hour W is read into
  the table, and ``SepsisLabel`` is never an input.
- **Onset.** The challenge sets ``SepsisLabel`` to 1 from six hours before the clinical
  onset ``t_sepsis`` (Sepsis-3: suspected infection plus a SOFA rise) onward. So with
  ``t_label`` the ``ICULOS`` of the first row whose ``SepsisLabel`` is 1, the onset is
  ``t_onset = t_label + 6``. When the record's first row is already labelled 1, the label was
  clipped at the start of the record and only ``t_onset <= t_label + 6`` is known.
- **Label 1**: the stay has a sepsis onset with ``t_onset > W + G`` (sepsis develops after
  the window and the gap, during the ICU stay). **Label 0**: ``SepsisLabel`` is 0 in every row
  of the stay.
- **Excluded** (leakage-free cohort; each stay counted in the first reason that applies,
  ``LoadSummary`` key in brackets):

  1. onset at or before the end of the window, ``t_onset <= W``: sepsis is already present
     while the inputs are recorded, so predicting it would be detection, not early
     warning (``excluded_onset_in_window``);
  2. labelled from the record's first row with ``t_label + 6 > W``: the onset may lie inside
     the window and cannot be placed (``excluded_onset_unknown``);
  3. onset inside the gap, ``W < t_onset <= W + G`` (``excluded_onset_in_gap``; none when
     G = 0);
  4. no row inside the window, i.e. the record starts after hour W (``excluded_no_rows_in_window``);
  5. the record ends within the window, last ``ICULOS <= W``: the stay is not followed up
     after the window, so "no sepsis" would be unobserved rather than observed
     (``excluded_ended_in_window``). The same rule applies to both classes, so length of
     follow-up cannot separate them.

  Why these choices: the inputs of every kept stay precede its onset (by more than G
  hours), and every kept stay was in the ICU beyond the window. A positive's
  ``SepsisLabel`` may already turn 1 inside the window when ``W < t_onset <= W + 6``; the
  label is not an input, and those hours are genuinely pre-onset. Note that the challenge
  truncated septic records at most 9 hours after ``t_label`` (about ``t_onset + 3``), so
  record length after the window must never become a feature; the table holds only the
  window.

- ``site`` is ``hospital_A`` / ``hospital_B`` (``training_setA`` / ``training_setB``);
  ``stay_id`` and ``patient_id`` are the file name without ``.psv`` (one stay per patient).
- ``static`` is ``Age``, ``Gender`` (1 male, 0 female), ``Unit`` (1 MICU when ``Unit1`` is 1,
  2 SICU when ``Unit2`` is 1, NaN when both are missing or inconsistent, counted as
  ``unit_unknown``) and ``HospAdmTime`` (hours from hospital to ICU admission, negative),
  taken from the first row (they are constant within a record in the real data; a record
  where they vary is counted as ``static_values_varying``).

Other counts: ``records_hospital_A`` / ``septic_records_hospital_A`` (and ``_B``): record
files read, and those with any ``SepsisLabel`` 1, before exclusions; ``stays_without_events``:
kept stays whose window rows hold no measured value (kept with zero events; predicted from
statics alone); ``files_without_rows``: header-only files (skipped).
Anything malformed raises :class:`DataError` naming the file and line: a wrong header, a
row without 41 fields, a value that is not a number (or ``NaN``), an infinite value or one
beyond float32, a missing or non-increasing ``ICULOS``, a ``SepsisLabel`` that is not 0 or 1;
a missing set folder names the sets present, to load only those.

Parsing: the files are read in batches of 4,096, their bodies joined and parsed by
pyarrow's multi-threaded CSV reader, then checked and turned into events with numpy.
All 40,336 files (315 MB) take 5-9 s on 2 cores, about 14 s when the files are not in the
page cache yet (right after unpacking); one ``pandas.read_csv`` per file would take minutes.
A malformed batch falls back to a line-by-line check that names the first bad line. A
process pool is not worth it: pyarrow already parses on both cores, and
:func:`hymate.data.load_dataset` parses once, then reads the parquet cache (about 1 s).

Real data, default task (W = 24 h, G = 0): 30,108 stays kept (hospital A 15,703 with 1,072
positives, B 14,405 with 663), 4,933,522 events; excluded 1,195 with onset in the window,
15 starting after it, 9,018 ending within it. With W = 48 h: 8,980 stays (1,179 positive),
as most records are shorter than two days.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from .stays import DataError, LoadSummary, StayTable, concat_tables

logger = logging.getLogger(__name__)

# Bump when the parser's output changes, so parquet caches of older parses are not reused.
PARSER_VERSION = 1

PHYSIONET2019_SETS: tuple[str, ...] = ("A", "B")
PHYSIONET2019_SITES: dict[str, str] = {"A": "hospital_A", "B": "hospital_B"}

PHYSIONET2019_VARIABLES: tuple[str, ...] = (
    "HR", "O2Sat", "Temp", "SBP", "MAP", "DBP", "Resp", "EtCO2", "BaseExcess", "HCO3", "FiO2",
    "pH", "PaCO2", "SaO2", "AST", "BUN", "Alkalinephos", "Calcium", "Chloride", "Creatinine",
    "Bilirubin_direct", "Glucose", "Lactate", "Magnesium", "Phosphate", "Potassium",
    "Bilirubin_total", "TroponinI", "Hct", "Hgb", "PTT", "WBC", "Fibrinogen", "Platelets",
)  # fmt: skip
PHYSIONET2019_STATIC: tuple[str, ...] = ("Age", "Gender", "Unit", "HospAdmTime")

COLUMNS: tuple[str, ...] = PHYSIONET2019_VARIABLES + (
    "Age", "Gender", "Unit1", "Unit2", "HospAdmTime", "ICULOS", "SepsisLabel",
)  # fmt: skip
HEADER = "|".join(COLUMNS)
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # rows are parsed as float32
ONSET_AFTER_FIRST_LABEL_HOURS = 6  # SepsisLabel is 1 from six hours before clinical onset

_N_VARS = len(PHYSIONET2019_VARIABLES)
_AGE, _GENDER, _UNIT1, _UNIT2, _HOSPADM, _ICULOS, _LABEL = range(_N_VARS, len(COLUMNS))
_BATCH_FILES = 4096

EXCLUSION_REASONS: tuple[str, ...] = (
    "excluded_onset_in_window",
    "excluded_onset_unknown",
    "excluded_onset_in_gap",
    "excluded_no_rows_in_window",
    "excluded_ended_in_window",
)


@dataclass(frozen=True)
class SepsisTask:
    """The prediction task's knobs (see the module docstring for the exact definition).

    ``observation_hours``: the input window W (hours since ICU admission, by ICULOS).
    ``gap_hours``: positives need their onset more than this many hours after the window.
    ``sets``: which of the two hospitals to load ("A", "B").
    """

    observation_hours: float = 24
    gap_hours: float = 0
    sets: tuple[str, ...] = PHYSIONET2019_SETS

    def __post_init__(self) -> None:
        object.__setattr__(self, "sets", _check_sets(self.sets))
        for name in ("observation_hours", "gap_hours"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a number of hours, got {value!r}")
        if self.observation_hours <= 0:
            raise ValueError(f"observation_hours must be > 0, got {self.observation_hours}")
        if self.gap_hours < 0:
            raise ValueError(f"gap_hours must be >= 0, got {self.gap_hours}")

    @property
    def cache_key(self) -> str:
        """Everything that changes the parse, as a file-name-safe string."""
        return f"{table_name(self.sets)}-w{self.observation_hours:g}-g{self.gap_hours:g}-v{PARSER_VERSION}"


def _check_sets(sets: Iterable[str]) -> tuple[str, ...]:
    sets = tuple(sets)
    bad = [s for s in sets if s not in PHYSIONET2019_SETS]
    if bad or not sets:
        raise ValueError(f"PhysioNet 2019 sets must be among {PHYSIONET2019_SETS}, got {sets}")
    if len(set(sets)) != len(sets):
        raise ValueError(f"PhysioNet 2019 sets listed twice: {sets}")
    return sets


def table_name(sets: Sequence[str]) -> str:
    """'physionet2019' for both hospitals, else 'physionet2019-A' or 'physionet2019-B'."""
    sets = _check_sets(sets)
    return "physionet2019" if sorted(sets) == list(PHYSIONET2019_SETS) else "physionet2019-" + "".join(sets)


# --------------------------------------------------------------------------------------
# Reading: raw files -> one float32 matrix per batch of files
# --------------------------------------------------------------------------------------


@dataclass
class _Batch:
    """Rows of several files stacked: ``rows[starts[i]:starts[i] + counts[i]]`` is file i."""

    paths: list[Path]
    rows: np.ndarray  # (R, 41) float32, NaN = missing
    counts: np.ndarray  # rows per file (all > 0)

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)


def _file_body(path: Path) -> bytes:
    """The file's rows (header checked and removed), one per line, ending in a newline."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read record file ({exc})") from exc
    header, _, body = data.partition(b"\n")
    header_text = header.decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r")
    if header_text != HEADER:
        found = header_text[:80] if data else "an empty file"
        raise DataError(f"{path}:1: missing or wrong header: expected the 41 challenge columns "
                        f"'HR|O2Sat|...|ICULOS|SepsisLabel', found {found!r}")  # fmt: skip
    body = body.replace(b"\r\n", b"\n").strip(b"\n")
    if b"\n\n" in body:  # blank lines carry nothing (the line-by-line check skips them too)
        body = b"\n".join(line for line in body.split(b"\n") if line.strip())
    return body + b"\n" if body else b""


def _locate_bad_line(paths: Sequence[Path]) -> DataError | None:
    """The first malformed line among ``paths`` as a DataError (slow; only after a failure)."""
    for path in paths:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        for lineno, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            fields = line.split("|")
            if len(fields) != len(COLUMNS):
                return DataError(f"{path}:{lineno}: expected {len(COLUMNS)} '|'-separated fields, found {len(fields)}")
            for name, text in zip(COLUMNS, fields, strict=True):
                try:
                    value = float(text)
                except ValueError:
                    return DataError(f"{path}:{lineno}: {name} value {text!r} is not a number (or NaN)")
                if math.isinf(value):
                    return DataError(f"{path}:{lineno}: {name} value {text!r} is not finite")
                if abs(value) > _FLOAT32_MAX:
                    return DataError(
                        f"{path}:{lineno}: {name} value {text!r} is beyond the float32 range "
                        f"(|x| <= {_FLOAT32_MAX:.3g}) that values are parsed into"
                    )
    return None


def _read_batch(paths: Sequence[Path], summary: LoadSummary) -> _Batch | None:
    """Parse a batch of record files; header-only files are skipped and counted."""
    bodies, counts, kept = [], [], []
    for path in paths:
        body = _file_body(path)
        if not body:
            summary.count("files_without_rows")
            logger.warning("%s: no data rows; skipped", path)
            continue
        bodies.append(body)
        counts.append(body.count(b"\n"))
        kept.append(path)
    if not kept:
        return None
    try:
        table = pacsv.read_csv(
            io.BytesIO(b"".join(bodies)),
            read_options=pacsv.ReadOptions(column_names=list(COLUMNS)),
            parse_options=pacsv.ParseOptions(delimiter="|"),
            # "NaN" parses as a float NaN; any other text fails and is located below.
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.float32() for c in COLUMNS}, null_values=[], strings_can_be_null=False
            ),
        )
    except pa.ArrowInvalid as exc:
        raise _locate_bad_line(kept) or DataError(f"{kept[0].parent}: unparseable record files ({exc})") from exc
    rows = np.empty((table.num_rows, len(COLUMNS)), dtype=np.float32)
    for j, name in enumerate(COLUMNS):
        rows[:, j] = table.column(name).to_numpy()
    counts_arr = np.asarray(counts, dtype=np.int64)
    if rows.shape[0] != counts_arr.sum():  # cannot happen with the bodies built above
        raise DataError(f"{kept[0].parent}: parsed {rows.shape[0]} rows, expected {counts_arr.sum()}")
    if np.isinf(rows).any():
        raise _locate_bad_line(kept) or DataError(f"{kept[0].parent}: infinite values")
    return _Batch(list(kept), rows, counts_arr)


# --------------------------------------------------------------------------------------
# The task: per-record timing -> cohort and label
# --------------------------------------------------------------------------------------


@dataclass
class RecordTiming:
    """Per-record hours (ICULOS) that decide cohort membership; arrays of one value per record.

    ``t_label`` is the ICULOS of the first row with SepsisLabel 1 (NaN if none);
    ``labelled_from_start`` is whether that is the record's first row.
    """

    first_hour: np.ndarray
    last_hour: np.ndarray
    t_label: np.ndarray
    labelled_from_start: np.ndarray


@dataclass
class Cohort:
    """Which records are kept, their labels, and why the others were excluded."""

    keep: np.ndarray  # bool per record
    labels: np.ndarray  # int8 per record (meaningful where keep)
    excluded: dict[str, int] = field(default_factory=dict)


def sepsis_cohort(timing: RecordTiming, task: SepsisTask) -> Cohort:
    """Apply the task definition (module docstring) to per-record timings."""
    w, g = float(task.observation_hours), float(task.gap_hours)
    septic = ~np.isnan(timing.t_label)
    onset = timing.t_label + ONSET_AFTER_FIRST_LABEL_HOURS  # NaN where not septic
    reasons = {
        "excluded_onset_in_window": septic & (onset <= w),
        "excluded_onset_unknown": septic & timing.labelled_from_start,
        "excluded_onset_in_gap": septic & (onset <= w + g),
        "excluded_no_rows_in_window": timing.first_hour > w,
        "excluded_ended_in_window": timing.last_hour <= w,
    }
    keep = np.ones(len(septic), dtype=bool)
    excluded = {}
    for name in EXCLUSION_REASONS:  # first reason wins
        hit = keep & reasons[name]
        excluded[name] = int(hit.sum())
        keep &= ~hit
    return Cohort(keep=keep, labels=septic.astype(np.int8), excluded=excluded)


def _record_timing(batch: _Batch) -> RecordTiming:
    """Per-file ICULOS facts; checks ICULOS and SepsisLabel and names the first bad line."""
    rows, counts, starts = batch.rows, batch.counts, batch.starts
    file_of_row = np.repeat(np.arange(len(counts)), counts)
    hours, label = rows[:, _ICULOS], rows[:, _LABEL]

    def fail(row: int, problem: str) -> DataError:
        f = int(file_of_row[row])
        return DataError(f"{batch.paths[f]}:{row - starts[f] + 2}: {problem}")

    bad = np.flatnonzero(np.isnan(hours))
    if len(bad):
        raise fail(int(bad[0]), "ICULOS is missing (NaN)")
    same_file = file_of_row[1:] == file_of_row[:-1]
    bad = np.flatnonzero(same_file & (hours[1:] <= hours[:-1]))
    if len(bad):
        row = int(bad[0]) + 1
        raise fail(row, f"ICULOS {hours[row]:g} does not increase (previous row {hours[row - 1]:g})")
    bad = np.flatnonzero((label != 0) & (label != 1))
    if len(bad):
        raise fail(int(bad[0]), f"SepsisLabel is {label[bad[0]]:g}, expected 0 or 1")

    hours_if_septic = np.where(label == 1, hours, np.inf)
    t_label = np.minimum.reduceat(hours_if_septic, starts)
    t_label[np.isinf(t_label)] = np.nan
    return RecordTiming(
        first_hour=hours[starts],
        last_hour=hours[starts + counts - 1],
        t_label=t_label,
        labelled_from_start=label[starts] == 1,
    )


# --------------------------------------------------------------------------------------
# Batch -> StayTable
# --------------------------------------------------------------------------------------


def _static(batch: _Batch, summary: LoadSummary) -> np.ndarray:
    """(files, 4) Age, Gender, Unit, HospAdmTime from each file's first row."""
    rows, starts = batch.rows, batch.starts
    demo = rows[:, _AGE : _HOSPADM + 1]
    first = demo[starts]
    reference = np.repeat(first, batch.counts, axis=0)
    varies = ~((demo == reference) | (np.isnan(demo) & np.isnan(reference)))
    if varies.any():
        file_of_row = np.repeat(np.arange(len(starts)), batch.counts)
        n = len(np.unique(file_of_row[varies.any(axis=1)]))
        summary.count("static_values_varying", n)
    unit1, unit2 = first[:, _UNIT1 - _AGE], first[:, _UNIT2 - _AGE]
    unit = np.where((unit1 == 1) & (unit2 == 0), 1.0, np.where((unit2 == 1) & (unit1 == 0), 2.0, np.nan))
    return np.stack(
        [first[:, 0], first[:, _GENDER - _AGE], unit.astype(np.float32), first[:, _HOSPADM - _AGE]], axis=1
    ).astype(np.float32)


def _batch_table(batch: _Batch, set_name: str, task: SepsisTask, summary: LoadSummary) -> StayTable:
    """The kept stays of one batch with their window's events."""
    timing = _record_timing(batch)
    cohort = sepsis_cohort(timing, task)
    site = PHYSIONET2019_SITES[set_name]
    summary.count(f"records_{site}", len(batch.paths))
    septic = int((~np.isnan(timing.t_label)).sum())
    if septic:
        summary.count(f"septic_records_{site}", septic)
    for name, n in cohort.excluded.items():
        if n:
            summary.count(name, n)
    static = _static(batch, summary)
    keep_files = np.flatnonzero(cohort.keep)
    unit_unknown = int(np.isnan(static[keep_files, 2]).sum())
    if unit_unknown:
        summary.count("unit_unknown", unit_unknown)

    # Events: non-NaN vitals/labs of kept files' rows inside the window, row-major, so they
    # come out sorted by stay, then hour, then the file's column order.
    file_of_row = np.repeat(np.arange(len(batch.counts)), batch.counts)
    in_window = cohort.keep[file_of_row] & (batch.rows[:, _ICULOS] <= task.observation_hours)
    window = batch.rows[in_window]
    r, c = np.nonzero(~np.isnan(window[:, :_N_VARS]))
    new_index = np.full(len(batch.counts), -1, dtype=np.int64)
    new_index[keep_files] = np.arange(len(keep_files))
    stay_of_event = new_index[file_of_row[in_window][r]]
    lengths = np.bincount(stay_of_event, minlength=len(keep_files)).astype(np.int64)
    empty = int((lengths == 0).sum())
    if empty:
        summary.count("stays_without_events", empty)
    offsets = np.zeros(len(keep_files) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])

    ids = np.array([batch.paths[i].stem for i in keep_files], dtype=object)
    return StayTable(
        name=table_name(task.sets),
        variables=PHYSIONET2019_VARIABLES,
        static_names=PHYSIONET2019_STATIC,
        stay_ids=ids,
        patient_ids=ids.copy(),
        sites=np.array([site] * len(keep_files), dtype=object),
        labels=cohort.labels[keep_files],
        static=static[keep_files],
        offsets=offsets,
        times=window[r, _ICULOS].astype(np.float32),
        variable_ids=(c + 1).astype(np.int32),
        values=window[r, c].astype(np.float32),
    )


def _empty_table(task: SepsisTask) -> StayTable:
    return StayTable(
        name=table_name(task.sets),
        variables=PHYSIONET2019_VARIABLES,
        static_names=PHYSIONET2019_STATIC,
        stay_ids=np.zeros(0, dtype=object),
        patient_ids=np.zeros(0, dtype=object),
        sites=np.zeros(0, dtype=object),
        labels=np.zeros(0, dtype=np.int8),
        static=np.zeros((0, len(PHYSIONET2019_STATIC)), dtype=np.float32),
        offsets=np.zeros(1, dtype=np.int64),
        times=np.zeros(0, dtype=np.float32),
        variable_ids=np.zeros(0, dtype=np.int32),
        values=np.zeros(0, dtype=np.float32),
    )


def load_physionet2019(root: str | Path, summary: LoadSummary | None = None, **options: object) -> StayTable:
    """The sepsis task's stays of the chosen hospitals (set order, then file-name order).

    ``options`` are :class:`SepsisTask` fields: ``observation_hours`` (24), ``gap_hours``
    (0), ``sets`` (("A", "B")). ``summary`` receives the exclusion and oddity counts.
    """
    task = SepsisTask(**options)  # type: ignore[arg-type]
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: PhysioNet 2019 folder not found")
    summary = summary if summary is not None else LoadSummary(source=table_name(task.sets))
    tables: list[StayTable] = []
    seen: set[str] = set()
    for set_name in task.sets:
        folder = root / f"training_set{set_name}"
        if not folder.is_dir():
            present = [s for s in PHYSIONET2019_SETS if (root / f"training_set{s}").is_dir()]
            raise DataError(
                f"{folder}: set folder not found (PhysioNet 2019 layout: training_set{set_name}/*.psv); to load "
                f"only the sets present ({', '.join(present) or 'none'}), pass sets=({', '.join(map(repr, present))},) "
                f"or hymate-sim --sets {','.join(present) or 'A'}"
            )
        paths = sorted(folder.glob("*.psv"))
        if not paths:
            raise DataError(f"{folder}: no record files (*.psv)")
        duplicates = seen.intersection(p.stem for p in paths)
        if duplicates:
            raise DataError(f"{folder}: record {sorted(duplicates)[0]} also occurs in another set")
        seen.update(p.stem for p in paths)
        for i in range(0, len(paths), _BATCH_FILES):
            batch = _read_batch(paths[i : i + _BATCH_FILES], summary)
            if batch is not None:
                tables.append(_batch_table(batch, set_name, task, summary))
        logger.info("%s: read %d record files", folder, len(paths))
    table = concat_tables(tables, name=table_name(task.sets)) if tables else _empty_table(task)
    summary.stays += len(table)
    summary.events += table.n_events
    logger.info("%s (W=%g h, gap %g h): %s", table.name, task.observation_hours, task.gap_hours, summary)
    return table
