"""What the label means for each dataset, in words a reader of a model card can check.

One table, so the model card (and anything else that explains a model) says the same thing
the loaders in ``hymate.data`` implement; README.md's dataset table says it for users.
"""

from __future__ import annotations

LABEL_DEFINITIONS: dict[str, str] = {
    "synthetic": (
        "planted signal: in-hospital death drawn from a known logistic model of latent severity, age, "
        "a late deterioration and a renal-by-age interaction (hymate.data.synthetic)"
    ),
    "physionet2012": "In-hospital_death from Outcomes-{a,b,c}.txt (PhysioNet/CinC 2012)",
    "physionet2019": (
        "sepsis onset after the first 24 ICU hours (PhysioNet/CinC 2019): inputs are the first 24 hours; "
        "onset = first hour with SepsisLabel = 1, plus 6; positive if onset is after hour 24, negative if "
        "SepsisLabel is 0 throughout; stays with onset inside the window, an unplaceable onset, a start after "
        "hour 24 or an end inside the window are excluded"
    ),
    "eicu": 'in-hospital death: hospitaldischargestatus = "Expired" (eICU-CRD patient.csv)',
    "mimic4": "in-hospital death: hospital_expire_flag of the stay's admission (MIMIC-IV hosp/admissions)",
}


def label_definition(dataset: str) -> str:
    return LABEL_DEFINITIONS.get(dataset, f"not documented for dataset {dataset!r}")
