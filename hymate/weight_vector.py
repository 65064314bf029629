"""A model's weights as one flat vector: the form in which they travel in a federation.

Flower moves every array of a message as a separate object, and a site's SuperNode fetches
each one from the coordinator, backing off 1, 2, 4, 8 s whenever the coordinator has not
finished uploading it. With one array per parameter tensor (70 for a small HyMaTE), a model
took 7-11 s to reach a loaded site; as one vector it is one object of a few chunks. Both
sides know the layout (sorted parameter names and shapes) from the model they build from the
same plan, so nothing about it travels, and a vector that does not fit is an error.

Aggregation is unchanged: FedAvg, FedAdam, medians, Krum and clipping act element-wise or on
the whole update's norm, which is the same on the vector as on the tensors.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

#: The name of the one array that carries a model's weights in a message.
WEIGHTS_KEY = "weights"


class WeightLayoutError(ValueError):
    """A vector does not fit the model it is meant for; says how."""


def to_vector(weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """All tensors, flattened and concatenated in sorted-name order (one dtype)."""
    names = sorted(weights)
    dtypes = {np.asarray(weights[name]).dtype for name in names}
    if len(dtypes) != 1:
        raise WeightLayoutError(f"weights mix dtypes {sorted(map(str, dtypes))}; one vector needs one dtype")
    return np.concatenate([np.ravel(weights[name]) for name in names])


def from_vector(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Split ``vector`` back into tensors named and shaped as in ``like``."""
    vector = np.asarray(vector)
    names = sorted(like)
    sizes = [int(np.asarray(like[name]).size) for name in names]
    dtype = np.asarray(like[names[0]]).dtype if names else vector.dtype
    if vector.ndim != 1 or vector.size != sum(sizes) or vector.dtype != dtype:
        raise WeightLayoutError(f"got {vector.dtype}{list(vector.shape)}, expected {dtype}[{sum(sizes)}]")
    pieces = np.split(vector, np.cumsum(sizes)[:-1])
    return {name: piece.reshape(np.shape(like[name])) for name, piece in zip(names, pieces, strict=True)}
