"""Loader for MIMIC-IV (v2.x/v3.x, and its demo) in the database's own CSV layout.

Layout read (DESIGN.md section 2; every file may be ``.csv`` or ``.csv.gz``)::

    root/icu/icustays.csv      subject_id, hadm_id, stay_id, first_careunit, intime, outtime, ...
    root/icu/chartevents.csv   subject_id, hadm_id, stay_id, charttime, itemid, valuenum, ...
    root/hosp/labevents.csv    subject_id, hadm_id, itemid, charttime, valuenum, ...
    root/hosp/admissions.csv   hadm_id, hospital_expire_flag, ...
    root/hosp/patients.csv     subject_id, gender, anchor_age, anchor_year, ...

Task: in-hospital mortality from the first ``observation_hours`` (default 48) after ICU
``intime``.

- One row of ``icustays`` is one stay: ``stay_id``, ``patient_id`` = ``subject_id`` (several
  stays per patient are kept; splits are patient-level), ``site`` = ``first_careunit``
  (e.g. "Medical Intensive Care Unit (MICU)"; MIMIC-IV is one hospital, so its units are
  the natural sites; an empty unit becomes "unknown", counted as ``missing_careunit``).
- ``label`` = ``hospital_expire_flag`` of the stay's admission (must be 0 or 1; a stay
  whose admission or patient is missing is an error).
- Stays shorter than ``min_stay_hours`` (default: the window; ``outtime - intime``) are
  excluded (``excluded_short_stay``; an empty outtime: ``excluded_missing_outtime``): a
  stay that ends inside the window would leak its outcome through its record's length.
- ``static``: ``Age`` at ICU admission (``anchor_age + year(intime) - anchor_year``;
  MIMIC-IV caps ``anchor_age`` at 91), ``Gender`` (1 "M", 0 "F", NaN otherwise).
- Events: ``valuenum`` of the vocabulary's items with ``charttime`` in
  ``[intime, intime + observation_hours]``, times in hours since ``intime``.
  ``chartevents`` rows belong to a stay by ``stay_id``. ``labevents`` rows belong to a
  stay by ``subject_id`` and ``charttime`` inside the stay's window (lab rows of ICU
  patients often lack ``hadm_id``, e.g. when drawn in the emergency department).
  Counted, per table (``chart``/``lab``): ``*_rows_not_in_vocabulary`` (rows of selected
  stays or patients with other itemids; ignored), ``*_rows_before_intime`` and
  ``*_rows_after_window`` (vocabulary rows of selected stays outside the window;
  ``lab_rows_outside_windows`` for labs, which belong to a patient rather than a stay),
  ``*_values_not_numeric`` (an empty ``valuenum``: the value was text).

Vocabulary (``MIMIC4_VARIABLES``; the same names and order as eICU's ``EICU_VARIABLES``):

======================  =====================================================================
variable                itemids
======================  =====================================================================
HR                      220045 Heart Rate
RespRate                220210 Respiratory Rate, 224690 Respiratory Rate (Total)
SpO2                    220277 O2 saturation pulseoxymetry
Temp                    223762 Temperature Celsius; 223761 Temperature Fahrenheit, as °C
SysABP/DiasABP/MAP      220050/220051/220052 Arterial BP, 225309/225310/225312 ART BP
NISysABP/NIDiasABP/     220179/220180/220181 Non Invasive Blood Pressure
NIMAP
ALP, ALT, AST           50863, 50861, 50878
Albumin, BUN            50862, 51006
Bilirubin               50885 (total)
Ca, Cl                  50893 (total calcium); 50902, 50806 (blood gas)
Creatinine              50912
Glucose                 50931, 50809 (blood gas)
HCO3                    50882 (bicarbonate, chemistry)
HCT, Hgb                51221, 50810 (blood gas); 51222, 50811 (blood gas)
INR, PTT                51237, 51275
K, Na                   50971, 50822 (blood gas); 50983, 50824 (blood gas)
Lactate, Mg             50813; 50960
PaCO2, PaO2, pH         50818, 50821, 50820 (blood gas, any specimen)
Phosphate, Platelets    50970; 51265
WBC                     51301
======================  =====================================================================

The chart items are those of MIT-LCP mimic-code's ``vitalsign`` concept, the lab items
those of its ``chemistry``, ``complete_blood_count``, ``bg``, ``enzyme`` and ``coagulation``
concepts. Values are as recorded (only °F is converted, with ``vocabulary.FAHRENHEIT_TO_CELSIUS``,
so one variable has one unit).

``chartevents`` and ``labevents`` are read in chunks of ``chunk_rows`` rows with only the
needed columns; each chunk is filtered to the vocabulary's itemids and the selected stays
(or patients) before anything else, so memory is bounded by the selected events.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .csv_tables import (
    DEFAULT_CHUNK_ROWS,
    Kind,
    check_sites,
    find_table,
    find_tables,
    iter_chunks,
    pack_events,
    parse_times,
    read_table,
    require_columns,
)
from .stays import DataError, LoadSummary, StayTable
from .vocabulary import FAHRENHEIT_TO_CELSIUS

logger = logging.getLogger(__name__)

# Bump when the parser's output changes, so parquet caches of older parses are not reused.
PARSER_VERSION = 1

MIMIC4_VARIABLES: tuple[str, ...] = (
    "HR", "RespRate", "SpO2", "Temp", "SysABP", "DiasABP", "MAP", "NISysABP", "NIDiasABP", "NIMAP",
    "ALP", "ALT", "AST", "Albumin", "BUN", "Bilirubin", "Ca", "Cl", "Creatinine", "Glucose", "HCO3",
    "HCT", "Hgb", "INR", "K", "Lactate", "Mg", "Na", "PaCO2", "PaO2", "PTT", "Phosphate", "Platelets",
    "WBC", "pH",
)  # fmt: skip
MIMIC4_STATIC: tuple[str, ...] = ("Age", "Gender")

TEMP_FAHRENHEIT_ITEMID = 223761
MIMIC4_CHART_ITEMS: dict[int, str] = {
    220045: "HR",
    220210: "RespRate",
    224690: "RespRate",
    220277: "SpO2",
    223762: "Temp",
    TEMP_FAHRENHEIT_ITEMID: "Temp",
    220050: "SysABP",
    225309: "SysABP",
    220051: "DiasABP",
    225310: "DiasABP",
    220052: "MAP",
    225312: "MAP",
    220179: "NISysABP",
    220180: "NIDiasABP",
    220181: "NIMAP",
}
MIMIC4_LAB_ITEMS: dict[int, str] = {
    50863: "ALP",
    50861: "ALT",
    50878: "AST",
    50862: "Albumin",
    51006: "BUN",
    50885: "Bilirubin",
    50893: "Ca",
    50902: "Cl",
    50806: "Cl",
    50912: "Creatinine",
    50931: "Glucose",
    50809: "Glucose",
    50882: "HCO3",
    51221: "HCT",
    50810: "HCT",
    51222: "Hgb",
    50811: "Hgb",
    51237: "INR",
    50971: "K",
    50822: "K",
    50813: "Lactate",
    50960: "Mg",
    50983: "Na",
    50824: "Na",
    50818: "PaCO2",
    50821: "PaO2",
    51275: "PTT",
    50970: "Phosphate",
    51265: "Platelets",
    51301: "WBC",
    50820: "pH",
}

ICUSTAYS_COLUMNS: dict[str, Kind] = {
    "subject_id": "integer",
    "hadm_id": "integer",
    "stay_id": "integer",
    "first_careunit": "text",
    "intime": "text",
    "outtime": "text",
}
ADMISSIONS_COLUMNS: dict[str, Kind] = {"hadm_id": "integer", "hospital_expire_flag": "text"}
PATIENTS_COLUMNS: dict[str, Kind] = {
    "subject_id": "integer",
    "gender": "text",
    "anchor_age": "number",
    "anchor_year": "integer",
}
CHART_COLUMNS: dict[str, Kind] = {"stay_id": "integer", "itemid": "integer", "charttime": "text", "valuenum": "number"}
LAB_COLUMNS: dict[str, Kind] = {"subject_id": "integer", "itemid": "integer", "charttime": "text", "valuenum": "number"}
UNKNOWN_SITE = "unknown"

_VOCAB = {name: i + 1 for i, name in enumerate(MIMIC4_VARIABLES)}
_SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class Mimic4Options:
    """What to load. ``sites``: first care units to keep (None: all); ``min_stay_hours`` None
    means the observation window; ``chunk_rows`` changes memory use, never the result."""

    observation_hours: float = 48.0
    min_stay_hours: float | None = None
    sites: tuple[str, ...] | None = None
    chunk_rows: int = DEFAULT_CHUNK_ROWS

    def __post_init__(self) -> None:
        if not (isinstance(self.observation_hours, int | float) and 0 < self.observation_hours < math.inf):
            raise ValueError(f"observation_hours must be > 0, got {self.observation_hours!r}")
        if self.min_stay_hours is not None and not (0 <= self.min_stay_hours < math.inf):
            raise ValueError(f"min_stay_hours must be >= 0 or None, got {self.min_stay_hours!r}")
        if not (isinstance(self.chunk_rows, int) and self.chunk_rows > 0):
            raise ValueError(f"chunk_rows must be a positive integer, got {self.chunk_rows!r}")
        if self.sites is not None:
            if isinstance(self.sites, str):
                raise ValueError(f"sites must be a sequence of care unit names, got {self.sites!r}")
            object.__setattr__(self, "sites", tuple(str(s) for s in self.sites))

    @property
    def min_stay(self) -> float:
        return self.observation_hours if self.min_stay_hours is None else self.min_stay_hours

    @property
    def cache_key(self) -> str:
        """Everything that changes the result (not ``chunk_rows``), file-name safe."""
        sites = "all" if self.sites is None else hashlib.sha1("\0".join(sorted(self.sites)).encode()).hexdigest()[:10]
        return f"mimic4-w{self.observation_hours:g}-m{self.min_stay:g}-s{sites}-v{PARSER_VERSION}"


@dataclass
class _Paths:
    icustays: Path
    chartevents: Path
    labevents: Path
    admissions: Path
    patients: Path

    @classmethod
    def find(cls, root: Path) -> _Paths:
        """Every table's file, headers checked, before any long read starts."""
        icu, hosp = root / "icu", root / "hosp"
        paths = cls(
            *find_tables(
                [(icu, "icustays"), (icu, "chartevents"), (hosp, "labevents"), (hosp, "admissions"), (hosp, "patients")]
            )
        )
        for path, columns in (
            (paths.icustays, ICUSTAYS_COLUMNS),
            (paths.chartevents, CHART_COLUMNS),
            (paths.labevents, LAB_COLUMNS),
            (paths.admissions, ADMISSIONS_COLUMNS),
            (paths.patients, PATIENTS_COLUMNS),
        ):
            require_columns(path, list(columns))
        return paths


# --------------------------------------------------------------------------------------
# Stays: icustays + admissions + patients -> the cohort
# --------------------------------------------------------------------------------------


@dataclass
class _Stays:
    """The selected stays, sorted by stay_id; times as int64 seconds since the epoch."""

    frame: pd.DataFrame  # stay_id, subject_id, site, label, intime_s, plus static columns

    def __len__(self) -> int:
        return len(self.frame)


def _seconds(times: pd.Series) -> np.ndarray:
    """datetime64 (any resolution) -> int64 seconds since the epoch."""
    return times.to_numpy().astype("datetime64[s]").astype(np.int64)


def _labels(paths: _Paths, stays: pd.DataFrame, chunk_rows: int, summary: LoadSummary) -> np.ndarray:
    admissions = read_table(paths.admissions, ADMISSIONS_COLUMNS, chunk_rows, summary)
    flag = admissions["hospital_expire_flag"].str.strip()
    bad = ~flag.isin(["0", "1"])
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{paths.admissions}:{i + 2}: hospital_expire_flag {admissions['hospital_expire_flag'].iloc[i]!r} "
            f"of admission {admissions['hadm_id'].iloc[i]} is not 0 or 1"
        )
    by_hadm = pd.Series(flag.astype(int).to_numpy(), index=admissions["hadm_id"].to_numpy())
    if by_hadm.index.has_duplicates:
        hadm = by_hadm.index[by_hadm.index.duplicated()][0]
        raise DataError(f"{paths.admissions}: hadm_id {hadm} listed twice")
    labels = by_hadm.reindex(stays["hadm_id"].to_numpy())
    missing = np.flatnonzero(labels.isna().to_numpy())
    if len(missing):
        row = stays.iloc[int(missing[0])]
        raise DataError(f"{paths.admissions}: no row for hadm_id {row['hadm_id']} (ICU stay {row['stay_id']})")
    return labels.to_numpy(dtype=np.int8)


def _static(paths: _Paths, stays: pd.DataFrame, summary: LoadSummary, chunk_rows: int) -> np.ndarray:
    patients = read_table(paths.patients, PATIENTS_COLUMNS, chunk_rows, summary)
    if patients["subject_id"].duplicated().any():
        subject = patients["subject_id"][patients["subject_id"].duplicated()].iloc[0]
        raise DataError(f"{paths.patients}: subject_id {subject} listed twice")
    patients = patients.set_index("subject_id")
    subjects = stays["subject_id"].to_numpy()
    missing = ~np.isin(subjects, patients.index.to_numpy())
    if missing.any():
        row = stays.iloc[int(np.flatnonzero(missing)[0])]
        raise DataError(f"{paths.patients}: no row for subject_id {row['subject_id']} (ICU stay {row['stay_id']})")
    rows = patients.loc[subjects]
    intime_year = stays["intime"].dt.year.to_numpy()
    age = rows["anchor_age"].to_numpy(dtype=float) + (intime_year - rows["anchor_year"].to_numpy())
    gender = rows["gender"].str.strip().map({"M": 1.0, "F": 0.0}).to_numpy(dtype=float)
    if np.isnan(gender).any():
        summary.count("gender_unknown", int(np.isnan(gender).sum()))
    return np.column_stack([age, gender]).astype(np.float32)


def _select_stays(paths: _Paths, options: Mimic4Options, summary: LoadSummary) -> _Stays:
    stays = read_table(paths.icustays, ICUSTAYS_COLUMNS, options.chunk_rows, summary)  # index = row number
    duplicated = stays["stay_id"].duplicated()
    if duplicated.any():
        i = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise DataError(f"{paths.icustays}:{i + 2}: stay_id {stays['stay_id'].iloc[i]} listed twice")
    unit = stays["first_careunit"].str.strip()
    if (unit.isna() | (unit == "")).any():
        summary.count("missing_careunit", int((unit.isna() | (unit == "")).sum()))
    stays["site"] = unit.where(unit.notna() & (unit != ""), UNKNOWN_SITE)
    check_sites(options.sites, sorted(stays["site"].unique()), "first_careunit", paths.icustays)
    if options.sites is not None:
        stays = stays[stays["site"].isin(options.sites)]

    stays = stays.assign(intime=parse_times(paths.icustays, "intime", stays["intime"]))
    has_out = stays["outtime"].notna() & (stays["outtime"].str.strip() != "")
    if (~has_out).any():
        summary.count("excluded_missing_outtime", int((~has_out).sum()))
    stays = stays[has_out]
    stays = stays.assign(outtime=parse_times(paths.icustays, "outtime", stays["outtime"]))
    hours = (_seconds(stays["outtime"]) - _seconds(stays["intime"])) / _SECONDS_PER_HOUR
    short = hours < options.min_stay
    if short.any():
        summary.count("excluded_short_stay", int(short.sum()))
    stays = stays[~short].sort_values("stay_id", kind="stable").reset_index(drop=True)

    frame = stays[["stay_id", "subject_id", "hadm_id", "site"]].copy()
    frame["label"] = _labels(paths, stays, options.chunk_rows, summary)
    frame["intime_s"] = _seconds(stays["intime"])
    static = _static(paths, stays, summary, options.chunk_rows)
    for j, name in enumerate(MIMIC4_STATIC):
        frame[name] = static[:, j]
    return _Stays(frame)


# --------------------------------------------------------------------------------------
# Events: chartevents / labevents -> long events
# --------------------------------------------------------------------------------------


@dataclass
class _Events:
    stay: list[np.ndarray]
    hours: list[np.ndarray]
    variable: list[np.ndarray]
    value: list[np.ndarray]

    def add(self, stay: np.ndarray, hours: np.ndarray, variable: np.ndarray, value: np.ndarray) -> None:
        self.stay.append(stay.astype(np.int64))
        self.hours.append(hours.astype(np.float64))
        self.variable.append(variable.astype(np.int32))
        self.value.append(value.astype(np.float64))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

        return (
            cat(self.stay, np.int64),
            cat(self.hours, np.float64),
            cat(self.variable, np.int32),
            cat(self.value, np.float64),
        )


def _item_lookup(items: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted itemids and their variable ids, for vectorised lookup."""
    ids = np.array(sorted(items), dtype=np.int64)
    return ids, np.array([_VOCAB[items[i]] for i in ids], dtype=np.int32)


def _numeric(values: np.ndarray, what: str, summary: LoadSummary) -> np.ndarray:
    """Mask of the values that are numbers; the others (text results) are counted."""
    numeric = ~np.isnan(values)
    if (~numeric).any():
        summary.count(f"{what}_values_not_numeric", int((~numeric).sum()))
    return numeric


def _read_chartevents(
    paths: _Paths, stays: _Stays, options: Mimic4Options, summary: LoadSummary, events: _Events
) -> None:
    """Vocabulary items of the selected stays inside their windows, by stay_id."""
    item_ids, item_vars = _item_lookup(MIMIC4_CHART_ITEMS)
    stay_index = pd.Index(stays.frame["stay_id"].to_numpy())
    intime = stays.frame["intime_s"].to_numpy()
    window = options.observation_hours
    for chunk in iter_chunks(paths.chartevents, CHART_COLUMNS, options.chunk_rows, summary):
        index = stay_index.get_indexer(chunk["stay_id"].to_numpy())
        itemid = chunk["itemid"].to_numpy()
        known = np.isin(itemid, item_ids)
        ours = index >= 0
        if (ours & ~known).any():
            summary.count("chart_rows_not_in_vocabulary", int((ours & ~known).sum()))
        keep = np.flatnonzero(ours & known)
        if not len(keep):
            continue
        sel = chunk.iloc[keep]
        seconds = _seconds(parse_times(paths.chartevents, "charttime", sel["charttime"]))
        hours = (seconds - intime[index[keep]]) / _SECONDS_PER_HOUR
        before, after = hours < 0, hours > window
        if before.any():
            summary.count("chart_rows_before_intime", int(before.sum()))
        if after.any():
            summary.count("chart_rows_after_window", int(after.sum()))
        inside = np.flatnonzero(~before & ~after)
        values = sel["valuenum"].to_numpy()[inside]
        use = inside[_numeric(values, "chart", summary)]
        item = itemid[keep][use]
        value = sel["valuenum"].to_numpy()[use]
        value = np.where(item == TEMP_FAHRENHEIT_ITEMID, FAHRENHEIT_TO_CELSIUS.apply(value), value)
        events.add(index[keep][use], hours[use], item_vars[np.searchsorted(item_ids, item)], value)


def _read_labevents(
    paths: _Paths, stays: _Stays, options: Mimic4Options, summary: LoadSummary, events: _Events
) -> None:
    """Vocabulary items of the selected patients inside any of their stays' windows."""
    item_ids, item_vars = _item_lookup(MIMIC4_LAB_ITEMS)
    windows = pd.DataFrame(
        {
            "subject_id": stays.frame["subject_id"].to_numpy(),
            "stay": np.arange(len(stays)),
            "intime_s": stays.frame["intime_s"].to_numpy(),
        }
    )
    subjects = windows["subject_id"].unique()
    window = options.observation_hours
    for chunk in iter_chunks(paths.labevents, LAB_COLUMNS, options.chunk_rows, summary):
        ours = np.isin(chunk["subject_id"].to_numpy(), subjects)
        itemid = chunk["itemid"].to_numpy()
        known = np.isin(itemid, item_ids)
        if (ours & ~known).any():
            summary.count("lab_rows_not_in_vocabulary", int((ours & ~known).sum()))
        keep = np.flatnonzero(ours & known)
        if not len(keep):
            continue
        sel = chunk.iloc[keep]
        rows = pd.DataFrame(
            {
                "row": keep,
                "subject_id": sel["subject_id"].to_numpy(),
                "seconds": _seconds(parse_times(paths.labevents, "charttime", sel["charttime"])),
                "itemid": itemid[keep],
                "valuenum": sel["valuenum"].to_numpy(),
            }
        )
        # A patient's lab rows against each of the patient's stay windows.
        matched = rows.merge(windows, on="subject_id")
        hours = (matched["seconds"].to_numpy() - matched["intime_s"].to_numpy()) / _SECONDS_PER_HOUR
        matched = matched[(hours >= 0) & (hours <= window)].assign(hours=hours[(hours >= 0) & (hours <= window)])
        outside = len(rows) - matched["row"].nunique()
        if outside:
            summary.count("lab_rows_outside_windows", outside)
        matched = matched[_numeric(matched["valuenum"].to_numpy(), "lab", summary)]
        events.add(
            matched["stay"].to_numpy(),
            matched["hours"].to_numpy(),
            item_vars[np.searchsorted(item_ids, matched["itemid"].to_numpy())],
            matched["valuenum"].to_numpy(),
        )


def load_mimic4(root: str | Path, summary: LoadSummary | None = None, **options: object) -> StayTable:
    """MIMIC-IV ICU stays of the chosen care units (stay_id order) with their window's events.

    ``options`` are :class:`Mimic4Options` fields: ``observation_hours`` (48),
    ``min_stay_hours`` (None: the window), ``sites`` (first care units; None: all),
    ``chunk_rows``.
    """
    opts = Mimic4Options(**options)  # type: ignore[arg-type]
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: MIMIC-IV folder not found")
    summary = summary if summary is not None else LoadSummary(source="mimic4")
    paths = _Paths.find(root)
    stays = _select_stays(paths, opts, summary)
    events = _Events([], [], [], [])
    _read_chartevents(paths, stays, opts, summary, events)
    _read_labevents(paths, stays, opts, summary, events)
    stay, hours, variable, value = events.arrays()

    frame = stays.frame
    table = pack_events(
        "mimic4",
        MIMIC4_VARIABLES,
        MIMIC4_STATIC,
        stay_ids=frame["stay_id"].astype(str).tolist(),
        patient_ids=frame["subject_id"].astype(str).tolist(),
        sites=frame["site"].tolist(),
        labels=frame["label"].to_numpy(),
        static=frame[list(MIMIC4_STATIC)].to_numpy(dtype=np.float32),
        stay_index=stay,
        times=hours,
        variable_ids=variable,
        values=value,
    )
    empty = int((table.lengths == 0).sum())
    if empty:
        summary.count("stays_without_events", empty)
    summary.stays += len(table)
    summary.events += table.n_events
    logger.info("mimic4 (W=%g h): %s", opts.observation_hours, summary)
    return table


def mimic4_sites(root: str | Path) -> list[str]:
    """The first care units present in ``icu/icustays`` (sorted; empty ones as "unknown")."""
    path = find_table(Path(root) / "icu", "icustays")
    unit = read_table(path, {"first_careunit": "text"})["first_careunit"].str.strip()
    return sorted(unit.where(unit.notna() & (unit != ""), UNKNOWN_SITE).unique())
