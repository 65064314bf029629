"""Patient-level, per-site, label-stratified train/val/test splits (DESIGN.md section 2.1).

Why this shape: in a federation every site splits its own stays, so the split is made site by
site; all stays of one patient land in the same split (no leakage through readmissions); and
each site's splits keep its label balance, so a small site's validation AUROC is defined.

The split depends only on the seed and on the table's content (patients are ordered by id
before shuffling), not on row order, and each site and class draws from its own random
stream, so adding a site leaves the other sites' splits unchanged.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass

import numpy as np

from .stays import DataError, StayTable

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True, eq=False)
class Split:
    """Row indices (sorted, int64) into the table that was split."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def parts(self) -> dict[str, np.ndarray]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def tables(self, table: StayTable) -> tuple[StayTable, StayTable, StayTable]:
        """(train, val, test) sub-tables of ``table``."""
        return table.subset(self.train), table.subset(self.val), table.subset(self.test)


def _allocate(n: int, fractions: tuple[float, float, float]) -> np.ndarray:
    """Counts per split for ``n`` patients of one (site, label) stratum.

    Largest-remainder rounding, then every split with a positive fraction gets at least one
    patient when the stratum has enough of them (taken from the largest split), so a site
    with only three deaths still has one in each of train, val and test.
    """
    exact = n * np.asarray(fractions)
    counts = np.floor(exact).astype(np.int64)
    remainder_order = np.argsort(-(exact - counts), kind="stable")
    counts[remainder_order[: n - counts.sum()]] += 1
    wanted = np.flatnonzero(np.asarray(fractions) > 0)
    if n >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] = 1
    return counts


def _stream(seed: int, site: str, label: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(site.encode()), label])


def split_stays(
    table: StayTable,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    require_both_classes: bool = False,
) -> Split:
    """Split ``table`` into train/val/test per site, by patient, stratified by label.

    A patient's label is the maximum over their stays (a patient who died once is a
    positive) and their site is that of their first stay in the table; a patient with stays
    at several sites (logged) is kept whole in one split. When a site's val or test part
    ends up without a positive or a negative (too few patients of a class), that is logged
    or, with ``require_both_classes``, raised as DataError naming the site.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1: {fractions}")
    if fractions[0] <= 0:
        raise ValueError(f"the train fraction must be positive: {fractions}")

    patients, first_row, patient_of_row = np.unique(
        table.patient_ids.astype(str), return_index=True, return_inverse=True
    )
    patient_label = np.zeros(len(patients), dtype=np.int8)
    np.maximum.at(patient_label, patient_of_row, table.labels.astype(np.int8))
    patient_site = table.sites.astype(str)[first_row]
    row_site = table.sites.astype(str)
    multi_site = np.flatnonzero(row_site != patient_site[patient_of_row])
    if len(multi_site):
        logger.warning(
            "%s: %d stays belong to patients first seen at another site; each patient is kept in one split",
            table.name,
            len(multi_site),
        )

    part_of_patient = np.zeros(len(patients), dtype=np.int8)
    for site in sorted({str(s) for s in patient_site}):
        for label in (0, 1):
            members = np.flatnonzero((patient_site == site) & (patient_label == label))
            if not len(members):
                continue  # members are in patient-id order, as np.unique sorts
            members = _stream(seed, site, label).permutation(members)
            counts = _allocate(len(members), fractions)
            part_of_patient[members] = np.repeat(np.arange(3, dtype=np.int8), counts)
        _check_classes(
            table.name,
            site,
            patient_site,
            patient_label,
            part_of_patient,
            fractions,
            require_both_classes,
        )

    part_of_row = part_of_patient[patient_of_row]
    train, val, test = (np.flatnonzero(part_of_row == i).astype(np.int64) for i in range(3))
    return Split(train=train, val=val, test=test)


def _check_classes(
    name: str,
    site: str,
    patient_site: np.ndarray,
    patient_label: np.ndarray,
    part_of_patient: np.ndarray,
    fractions: tuple[float, float, float],
    strict: bool,
) -> None:
    in_site = patient_site == site
    for i in (1, 2):
        if fractions[i] == 0:
            continue
        labels = set(patient_label[in_site & (part_of_patient == i)].tolist())
        if labels != {0, 1}:
            message = (
                f"{name}: site {site!r} has no "
                f"{'positive' if 1 not in labels else 'negative'} patient in its "
                f"{SPLIT_NAMES[i]} split ({int(patient_label[in_site].sum())} positives of "
                f"{int(in_site.sum())} patients); AUROC there is undefined"
            )
            if strict:
                raise DataError(message)
            logger.warning("%s", message)
