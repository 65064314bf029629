"""Patient-level, label-stratified splits of one site."""

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


def test_fractions_and_stratification_of_each_site(table):
    for site in table.site_names():
        alone = table.where_site(site)
        split = split_stays(alone, fractions=(0.7, 0.15, 0.15), seed=0)
        prevalence = alone.labels.mean()
        for part, fraction in ((split.train, 0.7), (split.val, 0.15), (split.test, 0.15)):
            assert abs(len(part) / len(alone) - fraction) < 0.03
            assert abs(alone.labels[part].mean() - prevalence) < 0.035


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


def _virtual_site(n_hospitals: int, patients_each: int, positives_each: int):
    """One virtual site drawn from many small hospitals, each keeping its name in ``sites``."""
    stays = [
        StayRecord(f"s{h}-{i}", f"p{h}-{i}", f"hospital-{h}", int(i < positives_each), [], [0.5], [1], [1.0])
        for h in range(n_hospitals)
        for i in range(patients_each)
    ]
    return table_from_stays("demo", ["x"], [], stays)


def test_a_virtual_site_is_stratified_as_one_site_not_by_its_original_hospitals():
    # 60 hospitals of 2 patients, one positive each: every (hospital, label) stratum has one
    # patient, so stratifying by the original hospital put all 60 positives in train.
    t = _virtual_site(60, 2, 1)
    split = split_stays(t, seed=0, require_both_classes=True, site="site-0")
    positives = [int(t.labels[p].sum()) for p in (split.train, split.val, split.test)]
    assert positives == [42, 9, 9]
    assert [len(p) for p in (split.train, split.val, split.test)] == [84, 18, 18]
    assert split.one_class is None


def test_a_one_site_table_keeps_the_split_it_had_per_site(table):
    # The stream of a one-site table is named by that site, as the per-site split's was, so
    # natural partitions keep their splits (these stay counts were measured on the old code).
    alone = table.where_site("site-1")
    split = split_stays(alone, seed=3)
    test = sorted(alone.stay_ids[split.test])
    assert len(test) == 41
    assert test[:3] == ["site-1-stay-012", "site-1-stay-019", "site-1-stay-037"]
    assert test[-3:] == ["site-1-stay-266", "site-1-stay-272", "site-1-stay-294"]


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
    assert sorted(split.one_class) == ["test", "val"]
    assert (
        "(0 positive and 2 negative patients there; the site has 1 positives of 10 patients)" in split.one_class["val"]
    )
    with pytest.raises(DataError, match="site 'ward-7' has no positive patient in its val split \\(0 positive and 2"):
        split_stays(t, seed=0, require_both_classes=True, site="ward-7")


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
