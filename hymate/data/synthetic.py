"""Synthetic multi-site ICU stays: the project's embedded default dataset (DESIGN.md section 2).

Why it looks the way it does: federated, local and centralized training should differ here
for the same reasons they differ on real data, and a model should have something real to
learn, while a CPU demo (4 sites x 500 stays) still trains in a minute or two.

The generative story of one stay (48 hours by default):

- Statics: Age, Sex (1 = male), Weight; each sometimes missing (NaN).
- A latent severity ``s`` (older patients are a little sicker) shifts the level of most
  vitals and labs; a patient-specific renal factor drives Creatinine.
- Some stays deteriorate (more likely when severe): from a random onset in the second
  half of the stay, HR, respiratory rate and lactate rise and blood pressure, SpO2 and GCS
  fall over ~6 hours, and vitals are measured more often. Only the end of the sequence
  shows it, so when things happen matters, not just the stay's averages.
- Mortality: ``logit = site intercept + 1.2 s + 0.5 age_z + 0.4 s * age_z + 1.8 d
  + 0.8 renal * [age >= 70]``; the last term is an interaction between a time series and a
  static feature. Outcomes are drawn from this probability, so even a model that knew the
  latents would reach an AUROC of only about 0.90 (seeds 0-2: 0.896-0.911). Logistic
  regression on per-variable mean/last/min/max/count and statics reaches about 0.80 (means
  alone about 0.78), so there is room for a sequence model.
- Sampling: every variable is a Poisson process with its own rate (vitals hourly-ish, labs
  a few times a day, sicker patients measured more), and some variables are never measured
  in some stays. A stay has about 160 events (1st-99th percentile about 55-370).

Per-site shifts (site ``k`` of ``n_sites``), spread deterministically over their ranges:
prevalence 10-30 % (the intercept is solved to hit it), measurement rate x0.6-1.5, case mix
(severity and age), how often labs are skipped, and value calibration (a per-site gain
and offset per variable, about a quarter of the between-patient sd). With ``unit_shift``
every fourth site (site-3, site-7, ...) records Temp in degrees Fahrenheit and Glucose in
mmol/L, as real hospitals do.

Deterministic by seed; each site draws from its own random stream, so adding sites does
not change the existing ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .stays import StayTable

SYNTHETIC_STATIC: tuple[str, ...] = ("Age", "Sex", "Weight")
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class VariableSpec:
    """How one synthetic variable behaves (levels in its usual unit)."""

    name: str
    mean: float
    between_sd: float  # spread of patients' own levels
    noise_sd: float  # measurement-to-measurement noise
    rate_per_hour: float  # base Poisson measurement rate
    p_never: float  # probability a stay never has it measured
    severity: float  # loading of the latent severity, in between_sd units (|x| <= 1)
    deterioration: float  # shift after deterioration onset, in between_sd units
    lo: float
    hi: float
    decimals: int


SYNTHETIC_SPECS: tuple[VariableSpec, ...] = (
    VariableSpec("HR", 86, 12, 5, 0.50, 0.00, 0.6, 1.8, 30, 220, 0),
    VariableSpec("SysBP", 120, 15, 7, 0.50, 0.05, -0.5, -1.6, 50, 250, 0),
    VariableSpec("DiasBP", 62, 9, 5, 0.50, 0.05, -0.3, -1.0, 20, 150, 0),
    VariableSpec("RespRate", 19, 4, 2, 0.40, 0.10, 0.5, 1.5, 5, 60, 0),
    VariableSpec("SpO2", 96.5, 2, 1.2, 0.40, 0.10, -0.4, -1.5, 60, 100, 0),
    VariableSpec("Temp", 37.0, 0.5, 0.3, 0.20, 0.05, 0.2, 0.5, 33, 42, 1),
    VariableSpec("GCS", 13, 2.5, 0.8, 0.12, 0.10, -0.7, -0.8, 3, 15, 0),
    VariableSpec("Urine", 120, 60, 40, 0.30, 0.10, -0.5, -1.0, 0, 1000, 0),
    VariableSpec("Lactate", 1.8, 0.9, 0.4, 0.08, 0.45, 0.8, 1.5, 0.3, 20, 1),
    VariableSpec("Creatinine", 1.2, 0.5, 0.15, 0.06, 0.10, 0.0, 0.3, 0.2, 12, 2),
    VariableSpec("WBC", 11, 4, 1.5, 0.05, 0.15, 0.4, 0.6, 0.5, 60, 1),
    VariableSpec("Glucose", 140, 35, 25, 0.10, 0.20, 0.1, 0.0, 40, 600, 0),
    VariableSpec("Platelets", 220, 70, 20, 0.05, 0.15, -0.3, 0.0, 5, 900, 0),
    VariableSpec("Sodium", 139, 4, 1.5, 0.06, 0.15, 0.0, 0.0, 115, 165, 0),
)
SYNTHETIC_VARIABLES: tuple[str, ...] = tuple(s.name for s in SYNTHETIC_SPECS)
_CREATININE = SYNTHETIC_VARIABLES.index("Creatinine")
_TEMP = SYNTHETIC_VARIABLES.index("Temp")
_GLUCOSE = SYNTHETIC_VARIABLES.index("Glucose")


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of :func:`make_synthetic`; the defaults are the project's demo dataset."""

    n_sites: int = 4
    stays_per_site: int = 500
    n_variables: int = len(SYNTHETIC_SPECS)  # the first n of SYNTHETIC_VARIABLES (4..14)
    seed: int = 0
    horizon_hours: float = 48.0
    site_size_sigma: float = 0.0  # lognormal spread of site sizes (0: all equal)
    prevalence_range: tuple[float, float] = (0.10, 0.30)
    rate_range: tuple[float, float] = (0.6, 1.5)  # per-site measurement-rate multiplier
    value_shift: float = 1.0  # strength of per-site calibration gain/offset (0: none)
    unit_shift: bool = True  # every 4th site: Temp in F, Glucose in mmol/L
    readmission_rate: float = 0.05  # share of stays that are a patient's second stay
    name: str = "synthetic"

    def __post_init__(self) -> None:
        if not 1 <= self.n_sites <= 10_000:
            raise ValueError(f"n_sites must be in 1..10000, got {self.n_sites}")
        if self.stays_per_site < 2:
            raise ValueError(f"stays_per_site must be >= 2, got {self.stays_per_site}")
        if not 4 <= self.n_variables <= len(SYNTHETIC_SPECS):
            raise ValueError(f"n_variables must be in 4..{len(SYNTHETIC_SPECS)}")
        if self.horizon_hours <= 0:
            raise ValueError(f"horizon_hours must be positive, got {self.horizon_hours}")
        lo, hi = self.prevalence_range
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"prevalence_range must satisfy 0 < lo <= hi < 1, got {lo, hi}")
        if not 0.0 < self.rate_range[0] <= self.rate_range[1]:
            raise ValueError(f"rate_range must be positive and ordered, got {self.rate_range}")
        if not 0.0 <= self.readmission_rate <= 0.5:
            raise ValueError(f"readmission_rate must be in [0, 0.5], got {self.readmission_rate}")

    def site_names(self) -> list[str]:
        """'site-0'.. (zero-padded when there are more than 10, so they sort naturally)."""
        width = len(str(self.n_sites - 1))
        return [f"site-{k:0{width}d}" for k in range(self.n_sites)]


@dataclass(frozen=True)
class SiteProfile:
    """The shifts that make one site different from the others."""

    name: str
    prevalence: float
    rate_multiplier: float
    severity_shift: float
    age_shift: float
    missing_multiplier: float
    fahrenheit_and_mmol: bool
    n_stays: int


def _spread(k: int, phase: float, lo: float, hi: float) -> float:
    """Low-discrepancy value in [lo, hi] for site k: any few sites already differ clearly."""
    return lo + (hi - lo) * ((phase + k * _GOLDEN) % 1.0)


def site_profiles(config: SyntheticConfig) -> list[SiteProfile]:
    """The per-site shifts :func:`make_synthetic` uses (also handy for reports and tests)."""
    sizes = np.full(config.n_sites, config.stays_per_site, dtype=np.int64)
    if config.site_size_sigma > 0:
        rng = np.random.default_rng([config.seed, 7_919])
        factors = rng.lognormal(0.0, config.site_size_sigma, config.n_sites)
        sizes = np.maximum(20, np.round(config.stays_per_site * factors / factors.mean()))
    return [
        SiteProfile(
            name=name,
            prevalence=_spread(k, 0.05, *config.prevalence_range),
            rate_multiplier=_spread(k, 0.55, *config.rate_range),
            severity_shift=_spread(k, 0.30, -0.3, 0.3),
            age_shift=_spread(k, 0.80, -4.0, 4.0),
            missing_multiplier=_spread(k, 0.15, 0.5, 1.5),
            fahrenheit_and_mmol=config.unit_shift and k % 4 == 3,
            n_stays=int(sizes[k]),
        )
        for k, name in enumerate(config.site_names())
    ]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _solve_intercept(logit: np.ndarray, prevalence: float) -> float:
    """The intercept a with mean(sigmoid(logit + a)) == prevalence (bisection)."""
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _sigmoid(logit + mid).mean() < prevalence:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass
class _SiteArrays:
    stay_ids: np.ndarray
    patient_ids: np.ndarray
    labels: np.ndarray
    static: np.ndarray
    lengths: np.ndarray
    times: np.ndarray
    variable_ids: np.ndarray
    values: np.ndarray


def _make_site(config: SyntheticConfig, k: int, site: SiteProfile) -> _SiteArrays:
    rng = np.random.default_rng([config.seed, k])
    specs = SYNTHETIC_SPECS[: config.n_variables]
    n, n_vars, horizon = site.n_stays, len(specs), config.horizon_hours

    # Patients: most have one stay; readmissions reuse an earlier patient of the same site.
    n_readmit = int(round(config.readmission_rate * n))
    n_patients = n - n_readmit
    patient = np.concatenate([np.arange(n_patients), rng.choice(n_patients, size=n_readmit, replace=False)])
    first = np.arange(n) < n_patients

    age_p = np.clip(rng.normal(64.0 + site.age_shift, 16.0, n_patients), 18, 95)
    sex_p = (rng.random(n_patients) < 0.56).astype(np.float64)
    weight_p = np.clip(rng.normal(74.0 + 10.0 * sex_p, 17.0), 35, 200)
    severity_p = rng.normal(site.severity_shift, 1.0, n_patients) + 0.3 * (age_p - 64) / 16
    renal_p = rng.normal(0.0, 1.0, n_patients)

    age = np.round(age_p[patient] + np.where(first, 0.0, rng.uniform(0, 1, n)))
    sex = sex_p[patient]
    weight = np.round(weight_p[patient] + np.where(first, 0.0, rng.normal(0, 2, n)), 1)
    redraw = np.where(first, 0.0, 1.0)  # a readmission is correlated with, not equal to, stay 1
    severity = severity_p[patient] * (1 - 0.3 * redraw) + redraw * rng.normal(0, 0.7, n)
    renal = 0.5 * severity + 0.85 * (renal_p[patient] * (1 - 0.3 * redraw) + redraw * rng.normal(0, 0.7, n))
    age_z = (age - 64.0) / 16.0

    deteriorates = rng.random(n) < _sigmoid(-1.6 + 0.9 * severity)
    onset = rng.uniform(0.35 * horizon, 0.9 * horizon, n)
    risk = 1.2 * severity + 0.5 * age_z + 0.4 * severity * age_z + 1.8 * deteriorates + 0.8 * renal * (age >= 70)
    intercept = _solve_intercept(risk, site.prevalence)
    labels = (rng.random(n) < _sigmoid(risk + intercept)).astype(np.int8)

    static = np.stack([age, sex, weight], axis=1)
    static[rng.random((n, 3)) < np.array([0.01, 0.01, 0.2])] = np.nan

    # Patient-level variable levels, in between-sd units.
    loading = np.array([s.severity for s in specs])
    own = rng.normal(0.0, 1.0, (n, n_vars))
    level = loading * severity[:, None] + np.sqrt(1.0 - loading**2) * own
    if n_vars > _CREATININE:
        level[:, _CREATININE] = renal

    # Measurement counts: Poisson per (stay, variable), plus extra vitals after deterioration.
    rates = np.array([s.rate_per_hour for s in specs]) * site.rate_multiplier
    patient_rate = rng.lognormal(0.0, 0.25, n) * np.exp(0.15 * severity)
    p_never = np.clip(np.array([s.p_never for s in specs]) * site.missing_multiplier, 0, 0.95)
    measured = rng.random((n, n_vars)) >= p_never
    counts = rng.poisson(rates * patient_rate[:, None] * horizon) * measured
    extra_rate = 0.5 * rates * (np.array([s.deterioration for s in specs]) != 0)
    extra = rng.poisson(extra_rate * (deteriorates * (horizon - onset))[:, None]) * measured

    pair = np.arange(n * n_vars)
    pair_base = np.repeat(pair, counts.ravel())
    pair_extra = np.repeat(pair, extra.ravel())
    stay = np.concatenate([pair_base, pair_extra]) // n_vars
    var = np.concatenate([pair_base, pair_extra]) % n_vars
    times = np.concatenate(
        [
            rng.uniform(0.0, horizon, len(pair_base)),
            onset[pair_extra // n_vars]
            + rng.uniform(0.0, 1.0, len(pair_extra)) * (horizon - onset[pair_extra // n_vars]),
        ]
    )

    mean = np.array([s.mean for s in specs])
    between = np.array([s.between_sd for s in specs])
    noise = np.array([s.noise_sd for s in specs])
    shift = np.array([s.deterioration for s in specs])
    ramp = np.clip((times - onset[stay]) / 6.0, 0.0, 1.0) * deteriorates[stay]
    values = (
        mean[var] + between[var] * (level[stay, var] + shift[var] * ramp) + noise[var] * rng.normal(0.0, 1.0, len(var))
    )
    lo, hi = np.array([s.lo for s in specs]), np.array([s.hi for s in specs])
    values = np.clip(values, lo[var], hi[var])

    # Site calibration: per variable, a gain on deviations from the usual level and an
    # offset, both in units of the between-patient sd (a 4 % gain on Temp itself would be a
    # 3-sd shift), then units.
    gain = np.exp(rng.normal(0.0, 0.1 * config.value_shift, n_vars))
    offset = rng.normal(0.0, 0.25 * config.value_shift, n_vars) * between
    values = mean[var] + (values - mean[var]) * gain[var] + offset[var]
    if site.fahrenheit_and_mmol:
        values = np.where(var == _TEMP, values * 1.8 + 32.0, values)
        values = np.where(var == _GLUCOSE, values / 18.0, values)
    decimals = np.array([s.decimals for s in specs])[var]
    if site.fahrenheit_and_mmol:
        decimals = np.where((var == _TEMP) | (var == _GLUCOSE), decimals + 1, decimals)
    values = np.round(values * 10.0**decimals) / 10.0**decimals

    order = np.lexsort((times, stay))
    width = len(str(n))
    return _SiteArrays(
        stay_ids=np.array([f"{site.name}-stay-{i:0{width}d}" for i in range(n)], dtype=object),
        patient_ids=np.array([f"{site.name}-patient-{p:0{width}d}" for p in patient], dtype=object),
        labels=labels,
        static=static.astype(np.float32),
        lengths=np.bincount(stay, minlength=n).astype(np.int64),
        times=times[order].astype(np.float32),
        variable_ids=(var[order] + 1).astype(np.int32),
        values=values[order].astype(np.float32),
    )


def make_synthetic(config: SyntheticConfig | None = None) -> StayTable:
    """Generate the synthetic multi-site dataset described in the module docstring."""
    config = config or SyntheticConfig()
    profiles = site_profiles(config)
    parts = [_make_site(config, k, p) for k, p in enumerate(profiles)]
    lengths = np.concatenate([p.lengths for p in parts])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return StayTable(
        name=config.name,
        variables=SYNTHETIC_VARIABLES[: config.n_variables],
        static_names=SYNTHETIC_STATIC,
        stay_ids=np.concatenate([p.stay_ids for p in parts]),
        patient_ids=np.concatenate([p.patient_ids for p in parts]),
        sites=np.concatenate(
            [np.full(len(p.labels), prof.name, dtype=object) for p, prof in zip(parts, profiles, strict=True)]
        ),
        labels=np.concatenate([p.labels for p in parts]),
        static=np.concatenate([p.static for p in parts]),
        offsets=offsets,
        times=np.concatenate([p.times for p in parts]),
        variable_ids=np.concatenate([p.variable_ids for p in parts]),
        values=np.concatenate([p.values for p in parts]),
    )
