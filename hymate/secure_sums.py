"""What a site's masked vector holds under secure aggregation, on both sides of the wire.

Secure aggregation (SecAgg+) reveals to the coordinator only the example-weighted mean of the
vectors the sites mask. A site masks one of two payloads, named by ``PHASE_KEY`` in the
instructions it receives:

- ``PHASE_NORMALISATION``: its moment sums (``MomentSums.to_arrays`` order, concatenated),
  encoded for an exact sum (below) and weighted equally, so the coordinator learns only totals;
- ``PHASE_TRAIN``: its model update (trained weights minus the received ones; small numbers,
  so the clipping range can be tight and the quantisation fine) followed by its training loss
  divided by ``LOSS_SCALE``, so the coordinator learns only the weighted mean loss.

Exact sums. SecAgg+ adds the sites' vectors as integers: each value is clipped to
``[-R, R]`` and quantised to ``Q`` levels, so a value carries ~22 bits. Normalisation sums
need more (SecAgg+) adds the sites' vectors as integers: each value is clipped to
``[-R, R]`` and quantised to ``Q`` levels, so a value carries ~22 bits. Normalisation sums
need more: a sum of squares can reach 1e13 while a rare variable's sum is below 1, and z-scores
take a difference of two such sums. So each value is written as ``DIGITS`` signed digits in
base ``2**DIGIT_BITS``, most significant first (``x = sum(d_k * 2**(TOP - DIGIT_BITS*(k+1)))``),
and each digit is placed exactly on the aggregator's quantisation grid. Stochastic rounding of a
value already on the grid changes nothing, so the integer sum of the digits is exact, and the
total is recovered to float64 precision (absolute error below ``2**(TOP - DIGITS*DIGIT_BITS)``,
relative error that of float64). Values beyond ``2**(TOP-1)`` in magnitude cannot be encoded.

The grid must be exact in binary floating point: ``R`` and ``Q`` powers of two (``GRID``).
"""

from __future__ import annotations

import math

import numpy as np

#: The aggregator settings the encoding is exact for: clipping range R, quantisation levels Q.
GRID_CLIPPING_RANGE = 8.0
GRID_QUANTIZATION_RANGE = 2**22
DIGIT_BITS = 20  # |digit| <= 2**19: a quarter of the grid's range, so many sites fit before clipping
DIGITS = 6
TOP = 64  # values up to 2**63 in magnitude; resolution 2**(64 - 120) = 1.4e-17

_STEP = 2 * GRID_CLIPPING_RANGE / GRID_QUANTIZATION_RANGE  # one quantisation level

#: The instruction key naming the payload, and its two values.
PHASE_KEY = "secure-phase"
PHASE_NORMALISATION = "normalisation"
PHASE_TRAIN = "train"
#: The training loss travels divided by this, so that any plausible loss fits the clipping range.
LOSS_SCALE = 64.0


def training_payload(update: np.ndarray, train_loss: float) -> np.ndarray:
    return np.concatenate([np.ravel(update).astype(np.float64), [train_loss / LOSS_SCALE]])


def split_training_payload(mean: np.ndarray) -> tuple[np.ndarray, float]:
    """(the mean update, the mean training loss) from the mean of the sites' payloads."""
    mean = np.asarray(mean, dtype=np.float64)
    return mean[:-1], float(mean[-1]) * LOSS_SCALE


class ExactSumError(ValueError):
    """A value cannot be encoded, or a sum does not decode to whole digits."""


def encoded_length(n_values: int) -> int:
    return n_values * DIGITS


def encode(values: np.ndarray) -> np.ndarray:
    """``values`` (1-D) as ``DIGITS`` grid points each, digit-major: ``[d_0 of all, d_1 of all, ...]``."""
    rest = np.asarray(values, dtype=np.float64).copy()
    if rest.ndim != 1 or not np.isfinite(rest).all():
        raise ExactSumError("only a finite 1-D vector can be encoded")
    if rest.size and np.abs(rest).max() >= 2.0 ** (TOP - 1):
        raise ExactSumError(f"a value of magnitude {np.abs(rest).max():.3g} exceeds 2**{TOP - 1}")
    digits = []
    for k in range(DIGITS):
        unit = 2.0 ** (TOP - DIGIT_BITS * (k + 1))
        digit = np.round(rest / unit)  # exact: division by a power of two, rounding to an integer
        rest -= digit * unit  # exact: what is left is smaller than half a unit
        digits.append(digit)
    return np.concatenate(digits) * _STEP


def decode(mean_of_encodings: np.ndarray, n_sites: int) -> np.ndarray:
    """The sum of the sites' original vectors, from the aggregator's mean of their encodings."""
    scaled = np.asarray(mean_of_encodings, dtype=np.float64) * n_sites / _STEP
    digits = np.round(scaled)
    if np.abs(scaled - digits).max(initial=0.0) > 1e-3:
        raise ExactSumError("the aggregate is not a sum of whole digits (were the grid settings changed?)")
    digits = digits.reshape(DIGITS, -1)
    units = [2.0 ** (TOP - DIGIT_BITS * (k + 1)) for k in range(DIGITS)]
    return np.array([math.fsum(d * u for d, u in zip(column, units, strict=True)) for column in digits.T])
