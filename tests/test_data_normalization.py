"""Federated z-score statistics: sums merge exactly and give numpy's mean/std."""

from __future__ import annotations

import numpy as np
import pytest

from hymate.data import (
    MomentSums,
    Normalizer,
    StayRecord,
    SyntheticConfig,
    make_synthetic,
    table_from_stays,
)


@pytest.fixture(scope="module")
def table():
    return make_synthetic(SyntheticConfig(seed=1, stays_per_site=150, n_variables=10))


def _assert_sums_close(a: MomentSums, b: MomentSums) -> None:
    for name, x in a.to_arrays().items():
        y = b.to_arrays()[name]
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-9, err_msg=name)


def test_merged_parts_equal_whole(table):
    whole = MomentSums.from_table(table)
    parts = [MomentSums.from_table(table.where_site(s)) for s in table.site_names()]
    _assert_sums_close(MomentSums.merge(*parts), whole)
    # Associative and commutative, with zeros as the neutral element.
    a, b, c, d = parts
    _assert_sums_close((a + b) + (c + d), a + (b + (c + d)))
    _assert_sums_close(MomentSums.merge(d, c, b, a), whole)
    zero = MomentSums.zeros(whole.n_variables, whole.n_static)
    _assert_sums_close(MomentSums.merge(zero, whole), whole)


def test_normalizer_equals_numpy(table):
    norm = MomentSums.from_table(table).to_normalizer()
    assert norm.value_mean.shape == (len(table.variables) + 1,)
    assert norm.value_mean[0] == 0 and norm.value_std[0] == 1  # padding
    for k in range(1, len(table.variables) + 1):
        v = table.values[table.variable_ids == k].astype(np.float64)
        np.testing.assert_allclose(norm.value_mean[k], v.mean(), rtol=1e-9)
        np.testing.assert_allclose(norm.value_std[k], v.std(), rtol=1e-7)
    np.testing.assert_allclose(norm.static_mean, np.nanmean(table.static.astype(float), 0))
    np.testing.assert_allclose(norm.static_std, np.nanstd(table.static.astype(float), 0))

    z = norm.normalize_values(table.variable_ids, table.values)
    assert z.dtype == np.float32
    hr = table.variable_ids == 1
    assert abs(z[hr].mean()) < 1e-4 and abs(z[hr].std() - 1) < 1e-4


def test_clipping_padding_and_static_mask():
    norm = Normalizer(
        value_mean=np.array([0.0, 10.0, 0.0]),
        value_std=np.array([1.0, 2.0, 1.0]),
        static_mean=np.array([50.0, 1.0]),
        static_std=np.array([10.0, 1.0]),
        clip=8.0,
    )
    ids = np.array([[1, 1, 2, 0]])
    values = np.array([[12.0, 1e6, -1e9, 0.0]])
    np.testing.assert_array_equal(norm.normalize_values(ids, values), [[1.0, 8.0, -8.0, 0.0]])
    z, present = norm.normalize_static(np.array([[70.0, np.nan], [np.nan, 3.0]]))
    np.testing.assert_array_equal(z, np.array([[2.0, 0.0], [0.0, 2.0]], np.float32))
    np.testing.assert_array_equal(present, [[True, False], [False, True]])


def test_unobserved_and_constant_variables():
    stays = [StayRecord("s", "p", "x", 0, [np.nan], [0.0, 1.0], [2, 2], [1.0, 1.0])]
    table = table_from_stays("t", ["never", "const"], ["age"], stays)
    norm = MomentSums.from_table(table).to_normalizer(min_std=1e-3)
    np.testing.assert_array_equal(norm.value_mean, [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(norm.value_std, [1.0, 1.0, 1e-3])
    np.testing.assert_array_equal(norm.static_mean, [0.0])
    np.testing.assert_array_equal(norm.static_std, [1.0])
    np.testing.assert_array_equal(norm.normalize_values(np.array([2]), np.array([1.0])), [0.0])


def test_transport_round_trip(table):
    sums = MomentSums.from_table(table)
    arrays = sums.to_arrays()
    assert all(a.dtype == np.float64 for a in arrays.values())
    _assert_sums_close(MomentSums.from_arrays(arrays), sums)
    _assert_sums_close(MomentSums.from_arrays(list(arrays.values())), sums)
    with pytest.raises(ValueError, match="missing"):
        MomentSums.from_arrays({"value_count": arrays["value_count"]})
    with pytest.raises(ValueError, match="one length"):
        MomentSums.from_arrays({**arrays, "value_sum": arrays["value_sum"][:-1]})
    norm = sums.to_normalizer()
    again = Normalizer.from_arrays(norm.to_arrays())
    for name, value in norm.to_arrays().items():
        np.testing.assert_array_equal(again.to_arrays()[name], value)


def test_noised_sums_stay_usable():
    """DP noise can make counts non-positive or variance negative; neither may crash."""
    sums = MomentSums(
        value_count=np.array([-2.0, 10.0]),
        value_sum=np.array([5.0, 10.0]),
        value_sumsq=np.array([1.0, 5.0]),  # variance 0.5 - 1 < 0
        static_count=np.array([0.0]),
        static_sum=np.array([3.0]),
        static_sumsq=np.array([4.0]),
    )
    norm = sums.to_normalizer(min_std=1e-2)
    np.testing.assert_array_equal(norm.value_mean, [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(norm.value_std, [1.0, 1.0, 1e-2])
    with pytest.raises(ValueError, match="cannot merge"):
        MomentSums.merge(sums, MomentSums.zeros(3, 1))
