"""One clinical vocabulary across sources: canonical names, units, conversions (DESIGN.md 2.3).

Each loader reads its source in that source's own vocabulary (PhysioNet 2012's ``NISysABP``,
PhysioNet 2019's ``SBP``, eICU's and MIMIC-IV's names for their columns and item ids).
``load_dataset(..., vocabulary="shared")`` maps any source's table onto this module's table:
every source then has the same variables, in the same order, with the same static features
and the same units, so a model trained on one source reads another's stays, stays of several
sources concatenate, and a model pre-trained on public data can start a private federation.

The table (``SHARED_VARIABLES``, ``SHARED_STATIC``) lists per canonical variable its unit, what
it measures, and the names it covers in each source, each with the conversion from that
source's unit (``Conversion``: ``value * scale + offset``). A variable only one source records
(PhysioNet 2012's ``MechVent``, PhysioNet 2019's ``EtCO2``) is kept, not dropped, and marked:
``ClinicalVariable.source_specific``. ``markdown_table()`` renders the table for the README.

Choices a reader should know about:

- Blood pressure is one variable per quantity (``SBP``, ``DBP``, ``MAP``) whatever the method:
  PhysioNet 2019 does not say whether its pressures are arterial-line or cuff readings, while
  PhysioNet 2012, eICU and MIMIC-IV record both separately. The source vocabulary keeps the
  distinction; the shared one gives it up so that every source's pressures meet.
- Pulse oximetry (``SpO2``: PhysioNet 2019's ``O2Sat``, eICU's ``sao2`` column, MIMIC-IV 220277)
  is kept apart from arterial saturation (``SaO2`` of PhysioNet 2012 and 2019).
- Units are the US conventional ones every source already uses in its data; the published
  PhysioNet documentation disagrees with the data in places (PhysioNet 2019 lists FiO2 in %,
  Lactate in mg/dL and Magnesium in mmol/dL, PhysioNet 2012 Mg in mmol/L, but their values are
  fractions, mmol/L and mg/dL: medians 0.50, 2.0 and 2.0 in the real files), and the table
  follows the data. One mix no name-based table can undo: 14 % of PhysioNet 2019's Calcium
  values look like ionised calcium in mmol/L (median 1.18, against 8.4 mg/dL for the rest);
  they stay as recorded. MIMIC-IV's Fahrenheit temperatures (item 223761) are converted by its
  loader with ``FAHRENHEIT_TO_CELSIUS`` from here, so its own vocabulary already has one unit
  per variable.
- Statics: ``Age``, ``Gender`` (1 male, 0 female), ``Height`` (cm), ``Weight`` (kg, at
  admission), ``HospAdmTime`` (hours from hospital to ICU admission); PhysioNet 2012's
  ``ICUType`` and PhysioNet 2019's ``Unit`` code units differently and stay source-specific.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hymate.settings_fields import setting

from .stays import DataError, StayTable

VOCABULARIES: tuple[str, ...] = ("source", "shared")

# The loaders the table covers, by the names ``load_dataset`` knows them under.
SOURCES: tuple[str, ...] = ("physionet2012", "physionet2019", "eicu", "mimic4")
_SHORT = {"p12": "physionet2012", "p19": "physionet2019", "eicu": "eicu", "mimic4": "mimic4"}


@dataclass(frozen=True)
class VocabularyChoice:
    """Which vocabulary a table is read in; the one declaration of the ``--vocabulary`` flag."""

    vocabulary: str = setting(
        "source",
        choices=VOCABULARIES,
        help="variable names and units: each source's own, or the shared clinical vocabulary "
        "(hymate/data/vocabulary.py) that lets a model trained on one source read another's",
    )


@dataclass(frozen=True)
class Conversion:
    """``canonical = value * scale + offset``: from a source's unit to the canonical one."""

    scale: float = 1.0
    offset: float = 0.0
    text: str = ""  # e.g. "°F -> °C"

    def apply(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float64) * self.scale + self.offset

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.offset == 0.0


SAME_UNIT = Conversion()
FAHRENHEIT_TO_CELSIUS = Conversion(1 / 1.8, -32 / 1.8, "°F -> °C")


@dataclass(frozen=True)
class SourceTerm:
    """A name in one source's own vocabulary, and how its values become the canonical unit."""

    source: str
    name: str
    conversion: Conversion = SAME_UNIT


@dataclass(frozen=True)
class ClinicalVariable:
    """One canonical measurement (or static feature) and the source names it covers."""

    name: str
    unit: str
    meaning: str
    terms: tuple[SourceTerm, ...]

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.source for t in self.terms))

    @property
    def source_specific(self) -> bool:
        """Recorded by one source only: kept in the shared vocabulary, but no other source fills it."""
        return len(self.sources) == 1


def _entry(name: str, unit: str, meaning: str, **by_source: str | tuple) -> ClinicalVariable:
    """``p12="SysABP"`` or ``p12=("SysABP", "NISysABP")``; a ``(name, Conversion)`` pair converts."""
    terms = []
    for short, names in by_source.items():
        for item in (names,) if isinstance(names, str) else names:
            source_name, conversion = (item, SAME_UNIT) if isinstance(item, str) else item
            terms.append(SourceTerm(_SHORT[short], source_name, conversion))
    return ClinicalVariable(name, unit, meaning, tuple(terms))


_E = _entry


def _both(name: str) -> dict[str, str]:
    """eICU and MIMIC-IV: their loaders already read both into one list of names (their docstrings)."""
    return dict.fromkeys(("eicu", "mimic4"), name)


# fmt: off
SHARED_VARIABLES: tuple[ClinicalVariable, ...] = (
    # vital signs
    _E("HR", "beats/min", "heart rate", p12="HR", p19="HR", **_both("HR")),
    _E("RespRate", "breaths/min", "respiratory rate", p12="RespRate", p19="Resp", **_both("RespRate")),
    _E("SpO2", "%", "oxygen saturation by pulse oximetry", p19="O2Sat", **_both("SpO2")),
    _E("SaO2", "%", "arterial oxygen saturation (blood gas)", p12="SaO2", p19="SaO2"),
    _E("Temp", "°C", "body temperature", p12="Temp", p19="Temp", **_both("Temp")),
    _E("SBP", "mmHg", "systolic blood pressure, arterial line or cuff",
       p12=("SysABP", "NISysABP"), p19="SBP", eicu=("SysABP", "NISysABP"), mimic4=("SysABP", "NISysABP")),
    _E("DBP", "mmHg", "diastolic blood pressure, arterial line or cuff",
       p12=("DiasABP", "NIDiasABP"), p19="DBP", eicu=("DiasABP", "NIDiasABP"), mimic4=("DiasABP", "NIDiasABP")),
    _E("MAP", "mmHg", "mean arterial pressure, arterial line or cuff",
       p12=("MAP", "NIMAP"), p19="MAP", eicu=("MAP", "NIMAP"), mimic4=("MAP", "NIMAP")),
    _E("EtCO2", "mmHg", "end-tidal carbon dioxide", p19="EtCO2"),
    _E("FiO2", "fraction", "fraction of inspired oxygen (0.21-1)", p12="FiO2", p19="FiO2"),
    _E("GCS", "score 3-15", "Glasgow coma score", p12="GCS"),
    _E("MechVent", "0/1", "on mechanical ventilation", p12="MechVent"),
    _E("Urine", "mL", "urine output since the last measurement", p12="Urine"),
    _E("Weight", "kg", "body weight measured during the stay", p12="Weight"),
    # blood gas, chemistry, haematology
    _E("pH", "", "arterial pH", p12="pH", p19="pH", **_both("pH")),
    _E("PaCO2", "mmHg", "arterial partial pressure of CO2", p12="PaCO2", p19="PaCO2", **_both("PaCO2")),
    _E("PaO2", "mmHg", "arterial partial pressure of O2", p12="PaO2", **_both("PaO2")),
    _E("HCO3", "mmol/L", "bicarbonate", p12="HCO3", p19="HCO3", **_both("HCO3")),
    _E("BaseExcess", "mmol/L", "base excess", p19="BaseExcess"),
    _E("Lactate", "mmol/L", "lactate", p12="Lactate", p19="Lactate", **_both("Lactate")),
    _E("Na", "mmol/L", "sodium", p12="Na", **_both("Na")),
    _E("K", "mmol/L", "potassium", p12="K", p19="Potassium", **_both("K")),
    _E("Cl", "mmol/L", "chloride", p19="Chloride", **_both("Cl")),
    _E("Ca", "mg/dL", "total calcium", p19="Calcium", **_both("Ca")),
    _E("Mg", "mg/dL", "magnesium", p12="Mg", p19="Magnesium", **_both("Mg")),
    _E("Phosphate", "mg/dL", "phosphate", p19="Phosphate", **_both("Phosphate")),
    _E("Glucose", "mg/dL", "glucose (laboratory or bedside)", p12="Glucose", p19="Glucose", **_both("Glucose")),
    _E("BUN", "mg/dL", "blood urea nitrogen", p12="BUN", p19="BUN", **_both("BUN")),
    _E("Creatinine", "mg/dL", "creatinine", p12="Creatinine", p19="Creatinine", **_both("Creatinine")),
    _E("Albumin", "g/dL", "albumin", p12="Albumin", **_both("Albumin")),
    _E("ALP", "IU/L", "alkaline phosphatase", p12="ALP", p19="Alkalinephos", **_both("ALP")),
    _E("ALT", "IU/L", "alanine aminotransferase", p12="ALT", **_both("ALT")),
    _E("AST", "IU/L", "aspartate aminotransferase", p12="AST", p19="AST", **_both("AST")),
    _E("Bilirubin", "mg/dL", "total bilirubin", p12="Bilirubin", p19="Bilirubin_total", **_both("Bilirubin")),
    _E("BilirubinDirect", "mg/dL", "direct bilirubin", p19="Bilirubin_direct"),
    _E("Cholesterol", "mg/dL", "cholesterol", p12="Cholesterol"),
    _E("TroponinI", "ng/mL", "troponin I (ng/mL = µg/L)", p12="TroponinI", p19="TroponinI"),
    _E("TroponinT", "ng/mL", "troponin T", p12="TroponinT"),
    _E("HCT", "%", "haematocrit", p12="HCT", p19="Hct", **_both("HCT")),
    _E("Hgb", "g/dL", "haemoglobin", p19="Hgb", **_both("Hgb")),
    _E("WBC", "10³/µL", "white blood cells", p12="WBC", p19="WBC", **_both("WBC")),
    _E("Platelets", "10³/µL", "platelets", p12="Platelets", p19="Platelets", **_both("Platelets")),
    _E("PTT", "s", "partial thromboplastin time", p19="PTT", **_both("PTT")),
    _E("INR", "ratio", "international normalised ratio", **_both("INR")),
    _E("Fibrinogen", "mg/dL", "fibrinogen", p19="Fibrinogen"),
)

SHARED_STATIC: tuple[ClinicalVariable, ...] = (
    _E("Age", "years", "age at ICU admission", p12="Age", p19="Age", **_both("Age")),
    _E("Gender", "1 male, 0 female", "sex", p12="Gender", p19="Gender", **_both("Gender")),
    _E("Height", "cm", "height at admission", p12="Height", eicu="Height"),
    _E("Weight", "kg", "weight at admission", p12="Weight", eicu="Weight"),
    _E("HospAdmTime", "hours", "hospital admission relative to ICU admission (negative)",
       p19="HospAdmTime", eicu="HospAdmTime"),
    _E("ICUType", "1-4", "PhysioNet 2012's unit: coronary, cardiac surgery, medical, surgical", p12="ICUType"),
    _E("Unit", "1-2", "PhysioNet 2019's unit: medical, surgical ICU", p19="Unit"),
)
# fmt: on

SHARED_VARIABLE_NAMES: tuple[str, ...] = tuple(v.name for v in SHARED_VARIABLES)
SHARED_STATIC_NAMES: tuple[str, ...] = tuple(v.name for v in SHARED_STATIC)


def _lookup(entries: tuple[ClinicalVariable, ...], source: str) -> dict[str, tuple[int, Conversion]]:
    """A source's own name -> (0-based index in ``entries``, conversion)."""
    return {t.name: (i, t.conversion) for i, v in enumerate(entries) for t in v.terms if t.source == source}


def _mapping(
    names: tuple[str, ...], entries: tuple[ClinicalVariable, ...], source: str, what: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(target index, scale, offset) per source name; a name the table does not cover is an error."""
    lookup = _lookup(entries, source)
    missing = [n for n in names if n not in lookup]
    if missing:
        raise DataError(
            f"{source}: {what} {missing} have no entry in the shared vocabulary (hymate/data/vocabulary.py)"
        )
    index = np.array([lookup[n][0] for n in names], dtype=np.int64)
    scale = np.array([lookup[n][1].scale for n in names], dtype=np.float64)
    offset = np.array([lookup[n][1].offset for n in names], dtype=np.float64)
    return index, scale, offset


def to_shared_vocabulary(table: StayTable, source: str) -> StayTable:
    """``table`` (read by ``source``'s loader, in its own vocabulary) in the shared vocabulary.

    Events keep their times and order; each gets its canonical variable id and its value in the
    canonical unit. Static features move to their canonical columns (NaN where a source has
    none). Several source names can meet in one variable (``SysABP`` and ``NISysABP`` in
    ``SBP``), so a stay can hold two events of one variable at one time.
    """
    check_vocabulary(source, "shared")
    index, scale, offset = _mapping(table.variables, SHARED_VARIABLES, source, "variables")
    native = table.variable_ids.astype(np.int64) - 1
    values = (table.values.astype(np.float64) * scale[native] + offset[native]).astype(np.float32)
    static_index, static_scale, static_offset = _mapping(table.static_names, SHARED_STATIC, source, "static features")
    static = np.full((len(table), len(SHARED_STATIC)), np.nan, dtype=np.float32)
    static[:, static_index] = (table.static.astype(np.float64) * static_scale + static_offset).astype(np.float32)
    return StayTable(
        name=table.name,
        variables=SHARED_VARIABLE_NAMES,
        static_names=SHARED_STATIC_NAMES,
        stay_ids=table.stay_ids,
        patient_ids=table.patient_ids,
        sites=table.sites,
        labels=table.labels,
        static=static,
        offsets=table.offsets,
        times=table.times,
        variable_ids=(index[native] + 1).astype(np.int32),
        values=values,
    )


def check_vocabulary(source: str, vocabulary: str) -> None:
    """Fail before any parsing: an unknown vocabulary, or the shared one for a source it does not cover."""
    if vocabulary not in VOCABULARIES:
        raise ValueError(f"unknown vocabulary {vocabulary!r}; valid: {', '.join(VOCABULARIES)}")
    if vocabulary == "shared" and source not in SOURCES:
        raise DataError(
            f"{source} has no entry in the shared vocabulary (it covers {', '.join(SOURCES)}); use --vocabulary source"
        )


def markdown_table() -> str:
    """The mapping as a Markdown table (README), source-specific rows marked."""
    rows = ["| variable | unit | " + " | ".join(SOURCES) + " |", "|---|---|" + "---|" * len(SOURCES)]
    for v in SHARED_VARIABLES + SHARED_STATIC:
        cells = []
        for source in SOURCES:
            terms = [t for t in v.terms if t.source == source]
            cells.append(
                ", ".join(
                    f"`{t.name}`" + (f" ({t.conversion.text})" if not t.conversion.is_identity else "") for t in terms
                )
            )
        kind = " (static)" if v in SHARED_STATIC else ""
        mark = " *" if v.source_specific else ""
        rows.append(f"| `{v.name}`{kind}{mark} | {v.unit} | " + " | ".join(cells) + " |")
    rows += [
        "",
        "\\* source-specific: kept, but no other source fills it. MIMIC-IV's `Temp` covers items 223762 (°C) "
        "and 223761 (°F, converted by its loader with `FAHRENHEIT_TO_CELSIUS`).",
    ]
    return "\n".join(rows)
