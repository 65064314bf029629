"""Z-score statistics that sites can combine without pooling data (DESIGN.md section 2.2).

Each site computes :class:`MomentSums` (per variable and per static feature: count, sum and
sum of squares, in float64) from its own training stays; these merge by addition, so the
coordinator combines any number of sites in any order, and the arrays travel as plain
numpy arrays (and can be DP-noised first). The merged sums give a :class:`Normalizer`.

Statistics are taken on raw values, as measured. Many lab values are skewed (Urine, ALT,
Lactate), so a few extreme values get large z-scores; rather than choosing a per-variable
transform, z-scores are clipped to +-``clip`` (default 8), which keeps wild outliers and unit
errors from dominating while leaving ordinary values untouched (the model can squash what is
left with ``--value-transform asinh``, a fixed function of the z-score, so these sums stay all
a federation exchanges). Std is the population std (ddof 0), floored at ``min_std`` so a
constant variable (PhysioNet 2012's MechVent is always 1) maps to 0 instead of dividing by
zero. A variable or static feature nobody observed gets mean 0 and std 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .stays import StayTable

MOMENT_ARRAYS = (
    "value_count", "value_sum", "value_sumsq", "static_count", "static_sum", "static_sumsq",
)  # fmt: skip
NORMALIZER_ARRAYS = ("value_mean", "value_std", "static_mean", "static_std")


@dataclass(frozen=True, eq=False)
class MomentSums:
    """Per-variable (index k - 1 for variable id k) and per-static-feature moment sums."""

    value_count: np.ndarray
    value_sum: np.ndarray
    value_sumsq: np.ndarray
    static_count: np.ndarray
    static_sum: np.ndarray
    static_sumsq: np.ndarray

    def __post_init__(self) -> None:
        for names in (MOMENT_ARRAYS[:3], MOMENT_ARRAYS[3:]):
            shapes = {np.shape(getattr(self, n)) for n in names}
            if len(shapes) != 1 or len(next(iter(shapes))) != 1:
                raise ValueError(f"{', '.join(names)} must be 1-D arrays of one length: {shapes}")
        for name in MOMENT_ARRAYS:
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))

    @property
    def n_variables(self) -> int:
        return len(self.value_count)

    @property
    def n_static(self) -> int:
        return len(self.static_count)

    @classmethod
    def from_table(cls, table: StayTable) -> MomentSums:
        """The sums over every event and every non-missing static value of ``table``."""
        n_vars = len(table.variables)
        ids = table.variable_ids.astype(np.int64)
        values = table.values.astype(np.float64)
        static = table.static.astype(np.float64)
        present = ~np.isnan(static)
        filled = np.where(present, static, 0.0)
        return cls(
            value_count=np.bincount(ids, minlength=n_vars + 1)[1:].astype(np.float64),
            value_sum=np.bincount(ids, weights=values, minlength=n_vars + 1)[1:],
            value_sumsq=np.bincount(ids, weights=values * values, minlength=n_vars + 1)[1:],
            static_count=present.sum(axis=0).astype(np.float64),
            static_sum=filled.sum(axis=0),
            static_sumsq=(filled * filled).sum(axis=0),
        )

    @classmethod
    def zeros(cls, n_variables: int, n_static: int) -> MomentSums:
        """The neutral element of :meth:`merge`."""
        v, s = np.zeros(n_variables), np.zeros(n_static)
        return cls(v, v.copy(), v.copy(), s, s.copy(), s.copy())

    @staticmethod
    def merge(*sums: MomentSums) -> MomentSums:
        """Elementwise sum of several sites' sums (associative and commutative)."""
        if not sums:
            raise ValueError("merge needs at least one MomentSums")
        first = sums[0]
        for other in sums[1:]:
            if (other.n_variables, other.n_static) != (first.n_variables, first.n_static):
                raise ValueError(
                    f"cannot merge sums over {other.n_variables} variables/{other.n_static} "
                    f"statics with {first.n_variables}/{first.n_static}"
                )
        return MomentSums(**{name: np.sum([getattr(s, name) for s in sums], axis=0) for name in MOMENT_ARRAYS})

    def __add__(self, other: MomentSums) -> MomentSums:
        return MomentSums.merge(self, other)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The six float64 arrays by name, in ``MOMENT_ARRAYS`` order (for transport)."""
        return {name: getattr(self, name).copy() for name in MOMENT_ARRAYS}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> MomentSums:
        """Inverse of :meth:`to_arrays`; also takes the six arrays as a list in that order."""
        if isinstance(arrays, Mapping):
            missing = [n for n in MOMENT_ARRAYS if n not in arrays]
            if missing:
                raise ValueError(f"moment arrays missing: {missing}")
            return cls(**{n: np.asarray(arrays[n]) for n in MOMENT_ARRAYS})
        if len(arrays) != len(MOMENT_ARRAYS):
            raise ValueError(f"expected arrays {MOMENT_ARRAYS}, got {len(arrays)} arrays")
        return cls(*(np.asarray(a) for a in arrays))

    def to_normalizer(self, min_std: float = 1e-3, clip: float = 8.0) -> Normalizer:
        """Means and stds from the sums; robust to noised sums (count <= 0, negative variance)."""
        value_mean, value_std = _mean_std(self.value_count, self.value_sum, self.value_sumsq, min_std)
        static_mean, static_std = _mean_std(self.static_count, self.static_sum, self.static_sumsq, min_std)
        return Normalizer(
            value_mean=np.concatenate([[0.0], value_mean]),
            value_std=np.concatenate([[1.0], value_std]),
            static_mean=static_mean,
            static_std=static_std,
            clip=clip,
        )


def _mean_std(count: np.ndarray, total: np.ndarray, sumsq: np.ndarray, min_std: float) -> tuple[np.ndarray, np.ndarray]:
    seen = count > 0
    safe = np.where(seen, count, 1.0)
    mean = np.where(seen, total / safe, 0.0)
    var = np.where(seen, np.maximum(sumsq / safe - mean * mean, 0.0), 1.0)
    return mean, np.maximum(np.sqrt(var), min_std)


@dataclass(frozen=True, eq=False)
class Normalizer:
    """Global z-score parameters.

    ``value_mean``/``value_std`` are indexed by variable id (index 0 is padding: mean 0,
    std 1, so padded values pass through unchanged); ``static_*`` by static feature.
    """

    value_mean: np.ndarray
    value_std: np.ndarray
    static_mean: np.ndarray
    static_std: np.ndarray
    clip: float = 8.0

    def __post_init__(self) -> None:
        for prefix in ("value", "static"):
            mean, std = getattr(self, f"{prefix}_mean"), getattr(self, f"{prefix}_std")
            if np.shape(mean) != np.shape(std) or np.ndim(mean) != 1:
                raise ValueError(f"{prefix}_mean and {prefix}_std must be 1-D of one length")
            if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
                raise ValueError(f"{prefix}_mean/{prefix}_std must be finite with std > 0")
        if not self.clip > 0:
            raise ValueError(f"clip must be positive, got {self.clip}")

    def normalize_values(self, variable_ids: np.ndarray, values: np.ndarray) -> np.ndarray:
        """float32 z-scores of ``values`` (any shape, padding id 0 allowed), clipped."""
        ids = np.asarray(variable_ids, dtype=np.int64)
        z = (np.asarray(values, dtype=np.float64) - self.value_mean[ids]) / self.value_std[ids]
        return np.clip(z, -self.clip, self.clip).astype(np.float32)

    def normalize_static(self, static: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(float32 clipped z-scores with missing -> 0, bool mask of present values)."""
        static = np.asarray(static, dtype=np.float64)
        present = ~np.isnan(static)
        z = (np.where(present, static, 0.0) - self.static_mean) / self.static_std
        z = np.where(present, np.clip(z, -self.clip, self.clip), 0.0)
        return z.astype(np.float32), present

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The four arrays by name plus ``clip`` as a 0-d array (for broadcasting)."""
        arrays = {name: getattr(self, name).copy() for name in NORMALIZER_ARRAYS}
        arrays["clip"] = np.asarray(self.clip, dtype=np.float64)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Normalizer:
        return cls(
            **{n: np.asarray(arrays[n], dtype=np.float64) for n in NORMALIZER_ARRAYS},
            clip=float(arrays.get("clip", 8.0)),
        )
