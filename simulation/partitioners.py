"""Splitting a dataset into virtual hospitals, patient by patient.

Schemes (``--partition``):
- ``natural``: the dataset's own sites (hospital, unit);
- ``iid``: patients dealt out uniformly at random;
- ``dirichlet:ALPHA``: label skew; each site's share of each class drawn from Dir(ALPHA)
  (small ALPHA: sites differ strongly in prevalence);
- ``quantity:ALPHA``: size skew; site sizes drawn from Dir(ALPHA), labels left iid.

Every scheme assigns whole patients (all stays of a patient go to one site), is
deterministic by seed, and guarantees ``min_size`` stays per site or fails with an error
that says which site would be too small. flwr-datasets' partitioners were considered: they
deal out rows of a Hugging Face ``Dataset``, not patients, and would add the ``datasets``
and ``huggingface_hub`` stack to a package that hospitals install offline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hymate.data.stays import StayTable


class PartitionError(ValueError):
    """A partition cannot be made as asked (unknown scheme, a site would be empty or too small)."""


@dataclass(frozen=True)
class PartitionScheme:
    kind: str
    alpha: float | None = None

    @classmethod
    def parse(cls, text: str) -> PartitionScheme:
        kind, _, value = text.partition(":")
        if kind in ("natural", "iid") and not value:
            return cls(kind)
        if kind in ("dirichlet", "quantity"):
            try:
                alpha = float(value)
            except ValueError:
                raise PartitionError(f"partition {text!r}: {kind} needs a positive ALPHA, as in {kind}:0.5") from None
            if not alpha > 0:
                raise PartitionError(f"partition {text!r}: ALPHA must be positive")
            return cls(kind, alpha)
        raise PartitionError(f"unknown partition {text!r}; use natural, iid, dirichlet:ALPHA or quantity:ALPHA")


def _patients(table: StayTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patient ids sorted, stay -> patient index, patient label = any positive stay)."""
    patients, stay_patient = np.unique(table.patient_ids.astype(str), return_inverse=True)
    labels = np.zeros(len(patients), dtype=np.int8)
    np.maximum.at(labels, stay_patient, table.labels)
    return patients, stay_patient, labels


def partition_stays(
    table: StayTable, scheme: PartitionScheme, n_sites: int, seed: int = 0, min_size: int = 20
) -> dict[str, np.ndarray]:
    """Site name -> row indices of its stays. ``n_sites`` is ignored by ``natural``."""
    if scheme.kind == "natural":
        sites = {name: np.flatnonzero(table.sites.astype(str) == name) for name in table.site_names()}
        return _checked(sites, min_size, scheme)
    if n_sites < 1:
        raise PartitionError(f"need at least one site, got {n_sites}")
    _, stay_patient, labels = _patients(table)
    rng = np.random.default_rng(seed)
    n_patients = len(labels)
    if n_patients < n_sites:
        raise PartitionError(f"{n_patients} patients cannot fill {n_sites} sites")
    site_of_patient = np.empty(n_patients, dtype=np.int64)
    if scheme.kind == "iid":
        site_of_patient[rng.permutation(n_patients)] = np.arange(n_patients) % n_sites
    elif scheme.kind == "quantity":
        shares = rng.dirichlet(np.full(n_sites, scheme.alpha))
        counts = _counts(n_patients, shares)
        site_of_patient[rng.permutation(n_patients)] = np.repeat(np.arange(n_sites), counts)
    else:  # dirichlet label skew: each class dealt out by its own Dirichlet draw
        for label in (0, 1):
            members = rng.permutation(np.flatnonzero(labels == label))
            counts = _counts(len(members), rng.dirichlet(np.full(n_sites, scheme.alpha)))
            site_of_patient[members] = np.repeat(np.arange(n_sites), counts)
    width = len(str(n_sites - 1))
    stay_site = site_of_patient[stay_patient]
    sites = {f"site-{i:0{width}d}": np.flatnonzero(stay_site == i) for i in range(n_sites)}
    return _checked(sites, min_size, scheme)


def _counts(n: int, shares: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``n`` in proportion to ``shares`` (largest remainders)."""
    exact = n * shares
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact)[: n - counts.sum()]] += 1
    return counts


def _remedy(scheme: PartitionScheme) -> str:
    """What a user can change, for this scheme, to make every site large enough."""
    if scheme.kind == "natural":
        return (
            "lower --min-site-size, or use another --partition (e.g. iid with --sites N): the natural sites are fixed"
        )
    if scheme.kind == "iid":
        return "use fewer --sites or a lower --min-site-size"
    return f"use fewer --sites, a larger ALPHA than {scheme.alpha:g} or a lower --min-site-size"


def _checked(sites: dict[str, np.ndarray], min_size: int, scheme: PartitionScheme) -> dict[str, np.ndarray]:
    small = {name: len(rows) for name, rows in sites.items() if len(rows) < max(min_size, 1)}
    if small:
        detail = ", ".join(f"{name}: {n} stays" for name, n in sorted(small.items()))
        raise PartitionError(
            f"{scheme.kind} partition leaves sites below the minimum of {max(min_size, 1)} stays ({detail}); "
            f"{_remedy(scheme)}"
        )
    return sites
