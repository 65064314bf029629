"""Loader for eICU-CRD v2.0 (and its demo) in the database's own CSV layout.

Layout read (DESIGN.md section 2; every file may be ``.csv`` or ``.csv.gz``)::

    root/patient.csv          one row per ICU unit stay (patientunitstayid)
    root/vitalPeriodic.csv    5-minute medians from bedside monitors
    root/vitalAperiodic.csv   non-invasive blood pressure (optional: skipped if absent)
    root/lab.csv              laboratory results (labname, labresult)

Times in eICU are integer minutes from ICU unit admission (``observationoffset``,
``labresultoffset``); there is no unit admission time column, admission is offset 0.

Task: in-hospital mortality from the first ``observation_hours`` (default 48) of the stay.

- One row of ``patient.csv`` is one stay: ``stay_id`` = ``patientunitstayid``,
  ``patient_id`` = ``uniquepid`` (a patient can have several stays; splits are
  patient-level), ``site`` = ``hospitalid`` (as text; 208 hospitals in v2.0).
- ``label`` = 1 if ``hospitaldischargestatus`` is "Expired", 0 if "Alive". An empty status
  excludes the stay (``excluded_missing_discharge_status``); any other value is an error.
- Stays shorter than ``min_stay_hours`` (default: the observation window), by
  ``unitdischargeoffset``, are excluded (``excluded_short_stay``; an empty offset:
  ``excluded_missing_unit_discharge_offset``), as in the PhysioNet 2012 challenge and the
  MIMIC benchmarks: a stay that ends inside the window would leak its outcome through
  the length of its record. ``min_stay_hours=0`` keeps every stay.
- ``static``: ``Age`` (years; "> 89" becomes 90, counted as ``age_over_89``), ``Gender``
  (1 Male, 0 Female, NaN otherwise, counted as ``gender_unknown``), ``Height`` (cm,
  ``admissionheight``), ``Weight`` (kg, ``admissionweight``), ``HospAdmTime`` (hours from
  hospital to unit admission, ``hospitaladmitoffset / 60``, negative). Values as recorded.
- Events: measured values with offsets in ``[0, observation_hours * 60]`` minutes, as
  hours; values before admission (``*_before_admission``) or after the window
  (``*_after_window``) are dropped and counted, per table (``vital``/``lab`` rows).

Vocabulary (``EICU_VARIABLES``; the same names, in the same order, as MIMIC-IV's so the two
sources share variable ids):

- vitalPeriodic: ``heartrate`` HR, ``respiration`` RespRate, ``sao2`` SpO2 (pulse
  oximetry despite the name), ``temperature`` Temp (°C), ``systemicsystolic`` /
  ``systemicdiastolic`` / ``systemicmean`` SysABP / DiasABP / MAP (invasive);
- vitalAperiodic: ``noninvasivesystolic`` / ``noninvasivediastolic`` / ``noninvasivemean``
  NISysABP / NIDiasABP / NIMAP;
- lab (``labname`` -> variable): see ``EICU_LAB_NAMES``. FiO2 is left out because eICU
  mixes fractions and percentages under one name. Rows of other lab names are ignored and
  counted (``lab_rows_not_in_vocabulary``); an empty ``labresult`` (the result was text,
  e.g. "<0.1") is counted as ``lab_values_not_numeric``.

Vital signs are thinned to the first value per variable per ``vital_interval_minutes``
(default 60, counted as ``vital_values_thinned``; 0 keeps every row): vitalPeriodic has a
row every 5 minutes, so 48 hours would give about 4,000 vital events per stay, and
sequences would be dominated by them (PhysioNet 2012 has about 420 events per stay in
all). Thinning keeps measured values at their measured times rather than averaging.
Stays with no event in the window are kept (``stays_without_events``).

Large tables are read in chunks of ``chunk_rows`` rows (only the needed columns, rows of
other stays dropped at once), so memory is bounded by the selected stays' events.
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
    read_table,
    require_columns,
)
from .stays import DataError, LoadSummary, StayTable

logger = logging.getLogger(__name__)

# Bump when the parser's output changes, so parquet caches of older parses are not reused.
PARSER_VERSION = 1

EICU_VITAL_COLUMNS: dict[str, str] = {
    "heartrate": "HR",
    "respiration": "RespRate",
    "sao2": "SpO2",
    "temperature": "Temp",
    "systemicsystolic": "SysABP",
    "systemicdiastolic": "DiasABP",
    "systemicmean": "MAP",
}
EICU_APERIODIC_COLUMNS: dict[str, str] = {
    "noninvasivesystolic": "NISysABP",
    "noninvasivediastolic": "NIDiasABP",
    "noninvasivemean": "NIMAP",
}
EICU_LAB_NAMES: dict[str, str] = {
    "alkaline phos.": "ALP",
    "ALT (SGPT)": "ALT",
    "AST (SGOT)": "AST",
    "albumin": "Albumin",
    "BUN": "BUN",
    "total bilirubin": "Bilirubin",
    "calcium": "Ca",
    "chloride": "Cl",
    "creatinine": "Creatinine",
    "glucose": "Glucose",
    "bedside glucose": "Glucose",
    "bicarbonate": "HCO3",
    "Hct": "HCT",
    "Hgb": "Hgb",
    "PT - INR": "INR",
    "potassium": "K",
    "lactate": "Lactate",
    "magnesium": "Mg",
    "sodium": "Na",
    "paCO2": "PaCO2",
    "paO2": "PaO2",
    "PTT": "PTT",
    "phosphate": "Phosphate",
    "platelets x 1000": "Platelets",
    "WBC x 1000": "WBC",
    "pH": "pH",
}
EICU_VARIABLES: tuple[str, ...] = (
    "HR", "RespRate", "SpO2", "Temp", "SysABP", "DiasABP", "MAP", "NISysABP", "NIDiasABP", "NIMAP",
    "ALP", "ALT", "AST", "Albumin", "BUN", "Bilirubin", "Ca", "Cl", "Creatinine", "Glucose", "HCO3",
    "HCT", "Hgb", "INR", "K", "Lactate", "Mg", "Na", "PaCO2", "PaO2", "PTT", "Phosphate", "Platelets",
    "WBC", "pH",
)  # fmt: skip
EICU_STATIC: tuple[str, ...] = ("Age", "Gender", "Height", "Weight", "HospAdmTime")

PATIENT_COLUMNS: dict[str, Kind] = {
    "patientunitstayid": "integer",
    "uniquepid": "text",
    "hospitalid": "integer",
    "gender": "text",
    "age": "text",
    "admissionheight": "number",
    "admissionweight": "number",
    "hospitaladmitoffset": "number",
    "unitdischargeoffset": "number",
    "hospitaldischargestatus": "text",
}
_VITAL_KEYS: dict[str, Kind] = {"patientunitstayid": "integer", "observationoffset": "integer"}
LAB_COLUMNS: dict[str, Kind] = {
    "patientunitstayid": "integer",
    "labresultoffset": "integer",
    "labname": "text",
    "labresult": "number",
}
DISCHARGE_STATUS = {"Alive": 0, "Expired": 1}
AGE_OVER_89 = 90.0  # eICU writes "> 89" for the oldest patients (HIPAA); 90 is its lower bound

_VOCAB = {name: i + 1 for i, name in enumerate(EICU_VARIABLES)}


@dataclass(frozen=True)
class EicuOptions:
    """What to load. ``sites``: hospital ids to keep (None: all); ``min_stay_hours`` None
    means the observation window; ``chunk_rows`` changes memory use, never the result."""

    observation_hours: float = 48.0
    min_stay_hours: float | None = None
    sites: tuple[str, ...] | None = None
    vital_interval_minutes: int = 60
    chunk_rows: int = DEFAULT_CHUNK_ROWS

    def __post_init__(self) -> None:
        if not (isinstance(self.observation_hours, int | float) and 0 < self.observation_hours < math.inf):
            raise ValueError(f"observation_hours must be > 0, got {self.observation_hours!r}")
        if self.min_stay_hours is not None and not (0 <= self.min_stay_hours < math.inf):
            raise ValueError(f"min_stay_hours must be >= 0 or None, got {self.min_stay_hours!r}")
        if not (isinstance(self.vital_interval_minutes, int) and self.vital_interval_minutes >= 0):
            raise ValueError(f"vital_interval_minutes must be an integer >= 0, got {self.vital_interval_minutes!r}")
        if not (isinstance(self.chunk_rows, int) and self.chunk_rows > 0):
            raise ValueError(f"chunk_rows must be a positive integer, got {self.chunk_rows!r}")
        if self.sites is not None:
            if isinstance(self.sites, str | int):
                raise ValueError(f"sites must be a sequence of hospital ids, got {self.sites!r}")
            object.__setattr__(self, "sites", tuple(str(s) for s in self.sites))

    @property
    def min_stay(self) -> float:
        return self.observation_hours if self.min_stay_hours is None else self.min_stay_hours

    @property
    def cache_key(self) -> str:
        """Everything that changes the result (not ``chunk_rows``), file-name safe."""
        sites = "all" if self.sites is None else hashlib.sha1("\0".join(sorted(self.sites)).encode()).hexdigest()[:10]
        return (
            f"eicu-w{self.observation_hours:g}-m{self.min_stay:g}-i{self.vital_interval_minutes}"
            f"-s{sites}-v{PARSER_VERSION}"
        )


# --------------------------------------------------------------------------------------
# Stays: patient.csv -> the cohort
# --------------------------------------------------------------------------------------


@dataclass
class _Stays:
    """The selected stays, sorted by patientunitstayid."""

    ids: np.ndarray  # int64 patientunitstayid
    patients: list[str]
    sites: list[str]
    labels: np.ndarray
    static: np.ndarray

    def index(self) -> pd.Index:
        return pd.Index(self.ids)


def _age(path: Path, values: pd.Series, summary: LoadSummary) -> np.ndarray:
    text = values.fillna("").astype(str).str.strip()
    over = text.str.replace(" ", "") == ">89"
    if over.any():
        summary.count("age_over_89", int(over.sum()))
    numbers = pd.to_numeric(text.where(~over & (text != "")), errors="coerce")
    bad = np.flatnonzero((numbers.isna() & ~over & (text != "")).to_numpy())
    if len(bad):
        i = int(bad[0])
        raise DataError(f"{path}:{values.index[i] + 2}: column age value {text.iloc[i]!r} is not an age")
    return np.where(over.to_numpy(), AGE_OVER_89, numbers.to_numpy(dtype=float))


def _select_stays(path: Path, options: EicuOptions, summary: LoadSummary) -> _Stays:
    patient = read_table(path, PATIENT_COLUMNS, options.chunk_rows, summary)  # index = row number
    duplicated = patient["patientunitstayid"].duplicated()
    if duplicated.any():
        i = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise DataError(f"{path}:{i + 2}: patientunitstayid {patient['patientunitstayid'].iloc[i]} listed twice")
    patient["site"] = patient["hospitalid"].astype(str)
    present = sorted(patient["site"].unique(), key=int)
    check_sites(options.sites, present, "hospitalid", path)
    if options.sites is not None:
        patient = patient[patient["site"].isin(options.sites)]

    status = patient["hospitaldischargestatus"].str.strip()
    missing = status.isna() | (status == "")
    if missing.any():
        summary.count("excluded_missing_discharge_status", int(missing.sum()))
    bad = ~missing & ~status.isin(list(DISCHARGE_STATUS))
    if bad.any():
        row = patient.index[np.flatnonzero(bad.to_numpy())[0]]
        raise DataError(
            f"{path}:{row + 2}: hospitaldischargestatus {patient.at[row, 'hospitaldischargestatus']!r} "
            f"of stay {patient.at[row, 'patientunitstayid']} is not 'Alive' or 'Expired' (or empty)"
        )
    patient = patient[~missing]
    offset = patient["unitdischargeoffset"]
    if offset.isna().any():
        summary.count("excluded_missing_unit_discharge_offset", int(offset.isna().sum()))
    short = offset < options.min_stay * 60.0
    if short.any():
        summary.count("excluded_short_stay", int(short.sum()))
    patient = patient[offset.notna() & ~short]

    no_pid = patient["uniquepid"].isna() | (patient["uniquepid"].str.strip() == "")
    if no_pid.any():
        row = patient.index[np.flatnonzero(no_pid.to_numpy())[0]]
        raise DataError(f"{path}:{row + 2}: column uniquepid is empty (needed for patient-level splits)")
    patient = patient.sort_values("patientunitstayid", kind="stable")

    gender = patient["gender"].str.strip().map({"Male": 1.0, "Female": 0.0}).astype(float)
    if gender.isna().any():
        summary.count("gender_unknown", int(gender.isna().sum()))
    static = np.column_stack(
        [
            _age(path, patient["age"], summary),
            gender.to_numpy(),
            patient["admissionheight"].to_numpy(dtype=float),
            patient["admissionweight"].to_numpy(dtype=float),
            patient["hospitaladmitoffset"].to_numpy(dtype=float) / 60.0,
        ]
    ).astype(np.float32)
    return _Stays(
        ids=patient["patientunitstayid"].to_numpy(dtype=np.int64),
        patients=patient["uniquepid"].str.strip().tolist(),
        sites=patient["site"].tolist(),
        labels=patient["hospitaldischargestatus"].str.strip().map(DISCHARGE_STATUS).to_numpy(dtype=np.int8),
        static=static.reshape(len(patient), len(EICU_STATIC)),
    )


# --------------------------------------------------------------------------------------
# Events: vitalPeriodic / vitalAperiodic / lab -> long events
# --------------------------------------------------------------------------------------


@dataclass
class _Events:
    """Long events collected from chunks: stay index, offset (minutes), variable id, value."""

    stay: list[np.ndarray]
    minutes: list[np.ndarray]
    variable: list[np.ndarray]
    value: list[np.ndarray]

    @classmethod
    def empty(cls) -> _Events:
        return cls([], [], [], [])

    def add(self, stay: np.ndarray, minutes: np.ndarray, variable: np.ndarray, value: np.ndarray) -> None:
        self.stay.append(stay.astype(np.int64))
        self.minutes.append(minutes.astype(np.int64))
        self.variable.append(variable.astype(np.int32))
        self.value.append(value.astype(np.float32))

    def frame(self) -> pd.DataFrame:
        def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

        return pd.DataFrame(
            {
                "stay": cat(self.stay, np.int64),
                "minutes": cat(self.minutes, np.int64),
                "variable": cat(self.variable, np.int32),
                "value": cat(self.value, np.float32),
            }
        )


def _in_window(
    chunk: pd.DataFrame, stays: pd.Index, offset_column: str, options: EicuOptions, what: str, summary: LoadSummary
) -> tuple[pd.DataFrame, np.ndarray]:
    """Rows of selected stays inside the window, and their stay indices; counts the rest."""
    index = stays.get_indexer(chunk["patientunitstayid"].to_numpy())
    chunk, index = chunk[index >= 0], index[index >= 0]
    minutes = chunk[offset_column].to_numpy()
    before, after = minutes < 0, minutes > options.observation_hours * 60.0
    if before.any():
        summary.count(f"{what}_rows_before_admission", int(before.sum()))
    if after.any():
        summary.count(f"{what}_rows_after_window", int(after.sum()))
    keep = ~before & ~after
    return chunk[keep], index[keep]


def _thin(frame: pd.DataFrame, interval_minutes: int) -> pd.DataFrame:
    """The first value per (stay, variable, interval); ties keep file order."""
    if interval_minutes == 0 or frame.empty:
        return frame
    frame = frame.assign(bin=frame["minutes"] // interval_minutes)
    frame = frame.sort_values(["stay", "variable", "minutes"], kind="stable")
    return frame.drop_duplicates(["stay", "variable", "bin"]).drop(columns="bin")


def _read_vitals(
    path: Path, columns: dict[str, str], stays: pd.Index, options: EicuOptions, summary: LoadSummary
) -> tuple[pd.DataFrame, int]:
    """Window events of one vital-sign table (thinned per chunk), and how many were measured."""
    kinds: dict[str, Kind] = {**_VITAL_KEYS, **dict.fromkeys(columns, "number")}
    collected: list[pd.DataFrame] = []
    measured_total = 0
    for chunk in iter_chunks(path, kinds, options.chunk_rows, summary):
        chunk, index = _in_window(chunk, stays, "observationoffset", options, "vital", summary)
        events = _Events.empty()
        for column, variable in columns.items():
            values = chunk[column].to_numpy()
            measured = ~np.isnan(values)
            measured_total += int(measured.sum())
            events.add(
                index[measured],
                chunk["observationoffset"].to_numpy()[measured],
                np.full(int(measured.sum()), _VOCAB[variable]),
                values[measured],
            )
        # Thin per chunk too, so memory holds about one value per variable per interval.
        collected.append(_thin(events.frame(), options.vital_interval_minutes))
    frame = pd.concat(collected, ignore_index=True) if collected else _Events.empty().frame()
    return frame, measured_total


def _read_labs(path: Path, stays: pd.Index, options: EicuOptions, summary: LoadSummary) -> pd.DataFrame:
    events = _Events.empty()
    for chunk in iter_chunks(path, LAB_COLUMNS, options.chunk_rows, summary):
        chunk, index = _in_window(chunk, stays, "labresultoffset", options, "lab", summary)
        variable = chunk["labname"].str.strip().map(EICU_LAB_NAMES).map(_VOCAB)
        known = variable.notna().to_numpy()
        if (~known).any():
            summary.count("lab_rows_not_in_vocabulary", int((~known).sum()))
        values = chunk["labresult"].to_numpy()
        numeric = known & ~np.isnan(values)
        if (known & ~numeric).any():
            summary.count("lab_values_not_numeric", int((known & ~numeric).sum()))
        events.add(
            index[numeric],
            chunk["labresultoffset"].to_numpy()[numeric],
            variable.to_numpy()[numeric].astype(np.int32),
            values[numeric],
        )
    return events.frame()


def load_eicu(root: str | Path, summary: LoadSummary | None = None, **options: object) -> StayTable:
    """eICU stays of the chosen hospitals (patientunitstayid order) with their window's events.

    ``options`` are :class:`EicuOptions` fields: ``observation_hours`` (48),
    ``min_stay_hours`` (None: the window), ``sites`` (hospital ids; None: all),
    ``vital_interval_minutes`` (60), ``chunk_rows``.
    """
    opts = EicuOptions(**options)  # type: ignore[arg-type]
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: eICU folder not found")
    summary = summary if summary is not None else LoadSummary(source="eicu")
    # Find every file and check every header before the long reads start.
    patient_path, vital_path, lab_path = find_tables([(root, "patient"), (root, "vitalPeriodic"), (root, "lab")])
    try:
        aperiodic_path: Path | None = find_table(root, "vitalAperiodic")
    except DataError:
        aperiodic_path = None
        logger.warning("%s: no vitalAperiodic.csv(.gz); non-invasive blood pressure will be missing", root)
        summary.count("vitalaperiodic_table_absent")
    require_columns(patient_path, list(PATIENT_COLUMNS))
    require_columns(vital_path, [*_VITAL_KEYS, *EICU_VITAL_COLUMNS])
    require_columns(lab_path, list(LAB_COLUMNS))
    if aperiodic_path is not None:
        require_columns(aperiodic_path, [*_VITAL_KEYS, *EICU_APERIODIC_COLUMNS])

    stays = _select_stays(patient_path, opts, summary)
    index = stays.index()
    parts = [_read_vitals(vital_path, EICU_VITAL_COLUMNS, index, opts, summary)]
    if aperiodic_path is not None:
        parts.append(_read_vitals(aperiodic_path, EICU_APERIODIC_COLUMNS, index, opts, summary))
    thinned = _thin(pd.concat([p[0] for p in parts], ignore_index=True), opts.vital_interval_minutes)
    n_thinned = sum(p[1] for p in parts) - len(thinned)  # the final pass also thins across chunks
    if n_thinned:
        summary.count("vital_values_thinned", n_thinned)
    events = pd.concat([thinned, _read_labs(lab_path, index, opts, summary)], ignore_index=True)

    table = pack_events(
        "eicu",
        EICU_VARIABLES,
        EICU_STATIC,
        stay_ids=[str(i) for i in stays.ids],
        patient_ids=stays.patients,
        sites=stays.sites,
        labels=stays.labels,
        static=stays.static,
        stay_index=events["stay"].to_numpy(),
        times=events["minutes"].to_numpy() / 60.0,
        variable_ids=events["variable"].to_numpy(),
        values=events["value"].to_numpy(),
    )
    empty = int((table.lengths == 0).sum())
    if empty:
        summary.count("stays_without_events", empty)
    summary.stays += len(table)
    summary.events += table.n_events
    logger.info("eicu (W=%g h): %s", opts.observation_hours, summary)
    return table


def eicu_sites(root: str | Path) -> list[str]:
    """The hospital ids present in ``patient.csv`` (as text, numeric order)."""
    path = find_table(Path(root), "patient")
    ids = read_table(path, {"hospitalid": "integer"})["hospitalid"].unique()
    return [str(i) for i in sorted(ids)]
