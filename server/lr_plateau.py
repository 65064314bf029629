"""The ``plateau`` learning-rate schedule: cut the sites' rate when the federation's validation score stops rising.

Centralized training anneals its rate over its epochs and keeps its best epoch. A federation at a
constant rate climbs to a validation peak (about round 10 on PhysioNet 2012's ICU types) and then
drifts down, while a cosine over the planned rounds cuts the rate before the peak. This schedule
waits for the evidence instead, as ``torch.optim.lr_scheduler.ReduceLROnPlateau`` does over
epochs: after ``PATIENCE`` completed rounds in a row without a new best validation AUROC + AUPRC
(``server.round_selection.validation_score``, the score ``keep-round best`` keeps by), every later
round trains at ``FACTOR`` times the rate, and the count starts again.

The rate is a function of the rounds on disk, so a resumed run continues at the rate it had. Like
``keep-round best`` it follows the sites' validation metrics, which DP-SGD does not cover.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from server.round_selection import validation_score

PATIENCE = 2  # rounds without a better validation score before the rate is cut
FACTOR = 0.5  # what each cut multiplies the rate by


def plateau_rate(initial: float, history: Iterable[dict[str, Any]]) -> float:
    """The rate for the round after ``history`` (the completed rounds' metrics, in order).

    A failed round changed nothing and a round without validation metrics says nothing: neither counts."""
    rate, best, waited = initial, None, 0
    for entry in history:
        score = None if "failed" in entry else validation_score(entry)
        if score is None:
            continue
        if best is None or score > best:
            best, waited = score, 0
            continue
        waited += 1
        if waited >= PATIENCE:
            rate, waited = rate * FACTOR, 0
    return rate
