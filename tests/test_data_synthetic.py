"""The synthetic generator: deterministic, shifted per site, learnable but not trivially."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from hymate.data import (
    SYNTHETIC_STATIC,
    SYNTHETIC_VARIABLES,
    StayTable,
    SyntheticConfig,
    load_dataset,
    make_synthetic,
    site_profiles,
)


@pytest.fixture(scope="module")
def demo() -> StayTable:
    return make_synthetic(SyntheticConfig(seed=0))


def _arrays(t: StayTable) -> list[np.ndarray]:
    return [t.stay_ids, t.patient_ids, t.sites, t.labels, t.static, t.offsets, t.times,
            t.variable_ids, t.values]  # fmt: skip


def test_deterministic_by_seed(demo):
    again = make_synthetic(SyntheticConfig(seed=0))
    for a, b in zip(_arrays(demo), _arrays(again), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    other = make_synthetic(SyntheticConfig(seed=1))
    assert not np.array_equal(other.labels, demo.labels)


def test_adding_sites_keeps_existing_sites(demo):
    bigger = make_synthetic(SyntheticConfig(seed=0, n_sites=6))
    first4 = bigger.subset(np.flatnonzero(np.isin(bigger.sites, demo.site_names())))
    np.testing.assert_array_equal(first4.values, demo.values)
    np.testing.assert_array_equal(first4.labels, demo.labels)


def test_shape_and_schema(demo):
    assert len(demo) == 2000
    assert demo.site_names() == ["site-0", "site-1", "site-2", "site-3"]
    assert demo.variables == SYNTHETIC_VARIABLES and len(demo.variables) == 14
    assert demo.static_names == SYNTHETIC_STATIC
    assert demo.times.dtype == np.float32 and demo.variable_ids.dtype == np.int32
    assert demo.times.min() >= 0 and demo.times.max() <= 48
    for i in range(0, len(demo), 97):  # time-sorted within stays
        assert np.all(np.diff(demo.events(i)[0]) >= 0)
    median = np.median(demo.lengths)
    assert 100 <= median <= 200 and demo.lengths.max() < 700
    # Missingness: statics sometimes NaN; some variables never measured in some stays.
    assert 0.1 < np.isnan(demo.static[:, 2]).mean() < 0.3
    lactate = SYNTHETIC_VARIABLES.index("Lactate") + 1
    has_lactate = np.array([np.any(demo.events(i)[1] == lactate) for i in range(len(demo))])
    assert 0.3 < 1 - has_lactate.mean() < 0.8
    # Readmissions: some patients have two stays, always at one site.
    assert len(set(demo.patient_ids)) == 2000 - 100
    for p in set(demo.patient_ids[:50]):
        assert len(set(demo.sites[demo.patient_ids == p])) == 1


def test_per_site_shifts(demo):
    prevalence = {s: demo.labels[demo.sites == s].mean() for s in demo.site_names()}
    assert all(0.07 < p < 0.35 for p in prevalence.values())
    assert max(prevalence.values()) - min(prevalence.values()) > 0.1
    events = {s: demo.lengths[demo.sites == s].mean() for s in demo.site_names()}
    assert max(events.values()) / min(events.values()) > 1.4
    # Units: site-3 records Temp in Fahrenheit.
    temp = SYNTHETIC_VARIABLES.index("Temp") + 1
    event_site = np.repeat(demo.sites, demo.lengths)
    temps = {s: np.median(demo.values[(demo.variable_ids == temp) & (event_site == s)])
             for s in demo.site_names()}  # fmt: skip
    assert 97 < temps["site-3"] < 100 and all(36 < temps[s] < 38 for s in ("site-0", "site-1"))
    profiles = site_profiles(SyntheticConfig())
    assert [p.fahrenheit_and_mmol for p in profiles] == [False, False, False, True]
    for p in profiles:
        assert abs(prevalence[p.name] - p.prevalence) < 0.06


def _summary_features(table: StayTable) -> np.ndarray:
    """Per variable mean, last, count; statics with mean imputation."""
    n_vars = len(table.variables)
    stay = np.repeat(np.arange(len(table)), table.lengths)
    key = stay * n_vars + table.variable_ids - 1
    count = np.bincount(key, minlength=len(table) * n_vars).reshape(len(table), n_vars)
    total = np.bincount(key, table.values, minlength=len(table) * n_vars).reshape(count.shape)
    last = np.zeros(len(table) * n_vars)
    last[key] = table.values  # events are time-sorted: the last write wins
    mean = total / np.maximum(count, 1)
    col_mean = total.sum(0) / np.maximum(count.sum(0), 1)
    mean = np.where(count > 0, mean, col_mean)
    last = np.where(count > 0, last.reshape(count.shape), col_mean)
    static = np.where(np.isnan(table.static), np.nanmean(table.static, 0), table.static)
    return np.concatenate([mean, last, count, static], axis=1)


def test_signal_is_learnable_but_not_trivial():
    train = make_synthetic(SyntheticConfig(seed=3, stays_per_site=400))
    test = make_synthetic(SyntheticConfig(seed=4, stays_per_site=400))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(_summary_features(train), train.labels)
    auroc = roc_auc_score(test.labels, model.predict_proba(_summary_features(test))[:, 1])
    assert 0.7 < auroc < 0.99


def test_scale_and_config_validation():
    table = make_synthetic(SyntheticConfig(n_sites=12, stays_per_site=20, n_variables=6))
    assert table.site_names()[:3] == ["site-00", "site-01", "site-02"] and len(table) == 240
    assert table.variables == SYNTHETIC_VARIABLES[:6] and table.variable_ids.max() <= 6
    sized = site_profiles(SyntheticConfig(n_sites=50, stays_per_site=100, site_size_sigma=1.0))
    sizes = [p.n_stays for p in sized]
    assert min(sizes) >= 20 and max(sizes) > 3 * min(sizes)
    with pytest.raises(ValueError, match="n_variables"):
        SyntheticConfig(n_variables=40)
    with pytest.raises(ValueError, match="prevalence_range"):
        SyntheticConfig(prevalence_range=(0.3, 0.1))


def test_load_dataset_synthetic():
    table = load_dataset("synthetic", None, n_sites=2, stays_per_site=30, seed=5)
    np.testing.assert_array_equal(
        table.values, make_synthetic(SyntheticConfig(n_sites=2, stays_per_site=30, seed=5)).values
    )
    with pytest.raises(TypeError, match="either config"):
        load_dataset("synthetic", None, config=SyntheticConfig(), seed=1)
