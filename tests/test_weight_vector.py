"""The model's weights travel as one vector: exact round trips, and a vector that does not fit is an error."""

import numpy as np
import pytest
import torch

from hymate.model import HyMaTE, ModelOptions
from hymate.weight_vector import WeightLayoutError, from_vector, to_vector


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    model = HyMaTE(ModelOptions(d_model=16, n_heads=2).for_schema(7, 3))
    return {name: t.numpy().copy() for name, t in model.state_dict().items()}


def test_a_model_survives_its_vector_bit_for_bit(weights):
    vector = to_vector(weights)
    assert vector.ndim == 1 and vector.dtype == np.float32
    assert vector.size == sum(a.size for a in weights.values())
    back = from_vector(vector, weights)
    assert list(back) == sorted(weights)
    for name, array in weights.items():
        np.testing.assert_array_equal(back[name], array)
        assert back[name].shape == array.shape


def test_the_vector_does_not_depend_on_dict_order(weights):
    reordered = dict(reversed(list(weights.items())))
    np.testing.assert_array_equal(to_vector(reordered), to_vector(weights))


def test_averaging_vectors_is_averaging_tensors(weights):
    other = {name: array + 1.0 for name, array in weights.items()}
    mean = from_vector((to_vector(weights) + to_vector(other)) / 2, weights)
    for name in weights:
        np.testing.assert_allclose(mean[name], weights[name] + 0.5, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda v: v[:-1], r"got float32\[\d+\], expected float32\[\d+\]"),
        (lambda v: v.astype(np.float64), r"got float64"),
        (lambda v: v.reshape(1, -1), r"got float32\[1, \d+\]"),
    ],
)
def test_a_vector_that_does_not_fit_is_a_named_error(weights, damage, message):
    with pytest.raises(WeightLayoutError, match=message):
        from_vector(damage(to_vector(weights)), weights)


def test_mixed_dtypes_cannot_be_one_vector():
    with pytest.raises(WeightLayoutError, match="mix dtypes"):
        to_vector({"a": np.zeros(2, np.float32), "b": np.zeros(2, np.int64)})
