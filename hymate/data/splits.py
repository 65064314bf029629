"""Patient-level, label-stratified train/val/test splits of one site (DESIGN.md section 2.1).

Why this shape: in a federation every site splits its own stays, so a split is made for the
site being split, whatever its stays' ``sites`` column says (a virtual hospital drawn from a
multi-hospital source keeps each stay's original hospital there; stratifying by those once
sent every original hospital with fewer than three patients of a class entirely to train, and
an iid 2-site run on the eICU demo had 106/0/0 positives in train/val/test). All stays of one
patient land in the same split (no leakage through readmissions), and the split keeps the
site's label balance, so its validation and test AUROC are defined where the site has at
least one patient of each class per split.

The split depends only on the seed and on the table's content (patients are ordered by id
before shuffling; each class draws from a random stream named by the seed, the table's site
names and the class), not on row order, so the simulator and each virtual site's ClientApp,
splitting the same stays, make the same split.
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
    """Row indices (sorted, int64) into the table that was split.

    ``one_class``: split name -> why that val or test split lacks a class (only when the
    split was allowed to go ahead without both classes).
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    one_class: dict[str, str] | None = None

    def parts(self) -> dict[str, np.ndarray]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def tables(self, table: StayTable) -> tuple[StayTable, StayTable, StayTable]:
        """(train, val, test) sub-tables of ``table``."""
        return table.subset(self.train), table.subset(self.val), table.subset(self.test)


def _allocate(n: int, fractions: tuple[float, float, float]) -> np.ndarray:
    """Counts per split for ``n`` patients of one class.

    Largest-remainder rounding, then every split with a positive fraction gets at least one
    patient when the class has enough of them (taken from the largest split), so a site
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


def _stream(seed: int, stream_name: str, label: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(stream_name.encode()), label])


def split_stays(
    table: StayTable,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    require_both_classes: bool = False,
    site: str | None = None,
) -> Split:
    """Split one site's stays into train/val/test by patient, stratified by label.

    ``table`` holds the stays of the site being split; ``site`` names it in messages
    (default: the table's one site name, or its name when it holds several). A patient's
    label is the maximum over their stays (a patient who died once is a positive). When a
    val or test split ends up without a positive or a negative patient, that is raised as a
    DataError naming the site and that split's counts with ``require_both_classes``, else
    logged as a warning and recorded in ``Split.one_class``.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1: {fractions}")
    if fractions[0] <= 0:
        raise ValueError(f"the train fraction must be positive: {fractions}")

    patients, patient_of_row = np.unique(table.patient_ids.astype(str), return_inverse=True)
    patient_label = np.zeros(len(patients), dtype=np.int8)
    np.maximum.at(patient_label, patient_of_row, table.labels.astype(np.int8))
    site_names = sorted({str(s) for s in table.sites})
    if site is None:
        site = site_names[0] if len(site_names) == 1 else table.name
    # One site name: the stream of that site (what splits made per original site used).
    stream_name = "\0".join(site_names)

    part_of_patient = np.zeros(len(patients), dtype=np.int8)
    for label in (0, 1):
        members = np.flatnonzero(patient_label == label)  # in patient-id order, as np.unique sorts
        if not len(members):
            continue
        members = _stream(seed, stream_name, label).permutation(members)
        counts = _allocate(len(members), fractions)
        part_of_patient[members] = np.repeat(np.arange(3, dtype=np.int8), counts)

    one_class = _one_class_splits(table.name, site, patient_label, part_of_patient, fractions)
    if one_class and require_both_classes:
        raise DataError("; ".join(one_class.values()))
    for message in one_class.values():
        logger.warning("%s", message)

    part_of_row = part_of_patient[patient_of_row]
    train, val, test = (np.flatnonzero(part_of_row == i).astype(np.int64) for i in range(3))
    return Split(train=train, val=val, test=test, one_class=one_class or None)


def _one_class_splits(
    name: str,
    site: str,
    patient_label: np.ndarray,
    part_of_patient: np.ndarray,
    fractions: tuple[float, float, float],
) -> dict[str, str]:
    """Split name -> message, for each val or test split without both classes."""
    problems = {}
    for i in (1, 2):
        if fractions[i] == 0:
            continue
        in_split = part_of_patient == i
        positives = int(patient_label[in_split].sum())
        negatives = int(in_split.sum()) - positives
        if positives and negatives:
            continue
        problems[SPLIT_NAMES[i]] = (
            f"{name}: site {site!r} has no {'positive' if not positives else 'negative'} patient in its "
            f"{SPLIT_NAMES[i]} split ({positives} positive and {negatives} negative patients there; the site has "
            f"{int(patient_label.sum())} positives of {len(patient_label)} patients); AUROC there is undefined"
        )
    return problems
