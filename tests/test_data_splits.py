"""Patient-level, per-site, stratified splits."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from hymate.data import (
    DataError,
    StayRecord,
    SyntheticConfig,
    make_synthetic,
    split_stays,
    table_from_stays,
)


@pytest.fixture(scope="module")
def table():
    return make_synthetic(SyntheticConfig(seed=2, stays_per_site=300, readmission_rate=0.2))


def _tiny(n_stays: int, n_pos: int, site: str = "tiny"):
    stays = [StayRecord(f"s{i}", f"p{i}", site, int(i < n_pos), [], [0.5], [1], [1.0]) for i in range(n_stays)]
    return table_from_stays("tiny", ["x"], [], stays)


def test_disjoint_complete_patient_level(table):
    split = split_stays(table, seed=0)
    parts = [split.train, split.val, split.test]
    everything = np.concatenate(parts)
    assert len(everything) == len(table) and set(everything) == set(range(len(table)))
    patients = [set(table.patient_ids[p]) for p in parts]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    assert len(set(table.patient_ids)) < len(table)  # readmissions exist, so this means something
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)


def test_fractions_and_stratification_per_site(table):
    split = split_stays(table, fractions=(0.7, 0.15, 0.15), seed=0)
    for site in table.site_names():
        in_site = table.sites == site
        n_site = in_site.sum()
        prevalence = table.labels[in_site].mean()
        for part, fraction in ((split.train, 0.7), (split.val, 0.15), (split.test, 0.15)):
            rows = part[in_site[part]]
            assert abs(len(rows) / n_site - fraction) < 0.03
            assert abs(table.labels[rows].mean() - prevalence) < 0.035


def test_deterministic_and_order_independent(table):
    a, b = split_stays(table, seed=7), split_stays(table, seed=7)
    for x, y in zip(a.parts().values(), b.parts().values(), strict=True):
        np.testing.assert_array_equal(x, y)
    c = split_stays(table, seed=8)
    assert not np.array_equal(a.test, c.test)
    # Shuffling the table's rows does not change which stays go where.
    perm = np.random.default_rng(0).permutation(len(table))
    shuffled = split_stays(table.subset(perm), seed=7)
    for name in ("train", "val", "test"):
        assert set(table.stay_ids[a.parts()[name]]) == set(table.subset(perm).stay_ids[shuffled.parts()[name]])


def test_site_split_does_not_depend_on_other_sites(table):
    whole = split_stays(table, seed=3)
    alone = split_stays(table.where_site("site-1"), seed=3)
    site_rows = np.flatnonzero(table.sites == "site-1")
    assert set(table.stay_ids[np.intersect1d(whole.test, site_rows)]) == set(
        table.where_site("site-1").stay_ids[alone.test]
    )


def test_tiny_site_keeps_one_positive_per_split():
    split = split_stays(_tiny(12, 3), seed=0)
    t = _tiny(12, 3)
    assert [int(t.labels[p].sum()) for p in (split.train, split.val, split.test)] == [1, 1, 1]


def test_too_few_positives_warns_or_raises(caplog):
    t = _tiny(10, 1)
    with caplog.at_level(logging.WARNING):
        split = split_stays(t, seed=0)
    assert "site 'tiny' has no positive patient in its val split" in caplog.text
    assert t.labels[split.train].sum() == 1  # the lone positive trains
    with pytest.raises(DataError, match="site 'tiny' has no positive patient in its val split"):
        split_stays(t, seed=0, require_both_classes=True)


def test_bad_fractions():
    with pytest.raises(ValueError, match="summing to 1"):
        split_stays(_tiny(4, 1), fractions=(0.5, 0.2, 0.2))
    split = split_stays(_tiny(20, 5), fractions=(0.8, 0.2, 0.0))
    assert len(split.test) == 0 and len(split.train) == 16


def test_tables_helper(table):
    split = split_stays(table, seed=0)
    train, val, test = split.tables(table)
    assert (len(train), len(val), len(test)) == (len(split.train), len(split.val), len(split.test))
    np.testing.assert_array_equal(val.stay_ids, table.stay_ids[split.val])
