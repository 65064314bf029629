"""Which round's model a federation ends with: the last, or the one the sites' validation stays rate best.

Centralized training stops early on validation AUROC + AUPRC (``hymate.train.fit``). A
federation without the same rule is judged at whatever round its plan ends on, often after its
best: on PhysioNet 2012's ICU types the global model peaked at round 6 of 10. Every site reports
the global model's AUROC, AUPRC and loss on its own validation stays (aggregates, like the test
metrics beside them). ``keep-round best`` keeps the round whose mean AUROC + AUPRC over the sites,
weighted by their validation stays, is highest; ``best-loss`` the round whose mean validation loss,
weighted the same way, is lowest. The test stays never choose the model they score.

Why a loss rule: a rank metric over a site's validation stays rests on its few positives (6-12 at
PhysioNet 2012's smaller ICU types), so one or two of them move the score by more than a round's
progress, and ``best`` can stop at a noisy early peak. The weighted mean of the sites' losses is
the loss over every validation stay of the federation (exactly so when the sites share one class
weight), a sum of per-stay terms that a few stays cannot swing.

``average-rounds K`` ends with the mean of the global models of the K completed rounds that end at
the kept round (Polyak-Ruppert tail averaging). Under DP every round's global model carries its
sites' fresh noise; the mean of the last K cancels much of it while the signal, which moves
slowly at the end of a plan, stays (the README measures it on PhysioNet 2012's ICU types at
epsilon 8). It only post-processes models the coordinator already holds, so it spends no privacy
budget. The sites evaluate the averaged model in a last message, so that the card's final
evaluation is of the model saved.

A site could misreport its validation metrics to sway the choice among the run's rounds, as it
can misreport its test metrics; screening (``server.screening``) only bounds them (ranks to
[0, 1], losses to >= 0).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from hymate.settings_fields import RunConfigError, check_choices, setting

log = logging.getLogger(__name__)

KEEP_ROUNDS = ("last", "best", "best-loss")
VALIDATION_METRICS = ("val-auroc", "val-auprc")
VALIDATION_LOSS = "val-loss"
VALIDATION_EXAMPLES = "val-num-examples"


@dataclass(frozen=True)
class RoundSelection:
    """The one declaration of the ``--keep-round`` flag and run-config key."""

    keep_round: str = setting(
        "last",
        choices=KEEP_ROUNDS,
        help="the model the run ends with: the last round's, (best) the round with the highest mean validation "
        "AUROC + AUPRC over the sites, early stopping as centralized training does, or (best-loss) the round with "
        "the lowest mean validation loss, steadier where the sites' validation stays hold few positives",
    )

    average_rounds: int = setting(
        1,
        help="end with the mean of the global models of this many completed rounds, ending at the kept round "
        "(1: the kept round's alone); under DP it averages the rounds' noise away at no privacy cost",
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if self.average_rounds < 1:
            raise RunConfigError(f"average-rounds must be at least 1, got {self.average_rounds}")


@dataclass(frozen=True)
class KeptRound:
    """The round whose model the run saved, and why (for the model card)."""

    round: int
    rule: str
    validation_score: float | None  # mean validation AUROC + AUPRC of that round, if reported
    validation_loss: float | None = None  # mean validation loss of that round, if reported
    averaged_rounds: tuple[int, ...] = ()  # the rounds whose models were averaged (average-rounds > 1)

    def as_record(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "rule": self.rule,
            "validation_auroc_plus_auprc": self.validation_score,
            "validation_loss": self.validation_loss,
            "averaged_rounds": list(self.averaged_rounds),
        }


def _site_weighted_mean(entry: dict[str, Any], metric: str) -> float | None:
    """One validation metric's mean over the sites that define it, weighted by their validation
    stays; None when no site reported it."""
    pairs = [
        (float(m[metric]), float(m.get(VALIDATION_EXAMPLES, 0)))
        for m in entry["sites"]["evaluate"].values()
        if isinstance(m.get(metric), (int, float)) and math.isfinite(m[metric])
    ]
    weight = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / weight if weight > 0 else None


def validation_score(entry: dict[str, Any]) -> float | None:
    """Validation AUROC + AUPRC of one round; None unless some site reported each."""
    means = [_site_weighted_mean(entry, metric) for metric in VALIDATION_METRICS]
    return None if None in means else sum(means)


def validation_loss(entry: dict[str, Any]) -> float | None:
    """Validation loss of one round; None when no site reported one."""
    return _site_weighted_mean(entry, VALIDATION_LOSS)


def kept_round(history: list[dict[str, Any]], rule: str) -> KeptRound:
    """The round to keep from a run's ``history`` (round metrics in order) under ``rule``.

    Failed rounds changed nothing and are kept only when every round failed (the model is then
    the initial one); ``best`` and ``best-loss`` fall back to the last round, saying so, when no
    round carries their validation metric (sites on an older client)."""
    completed = [entry for entry in history if "failed" not in entry]
    if not completed:
        return KeptRound(history[-1]["round"], "last (every round failed: the initial model)", None)

    def kept(entry: dict[str, Any], why: str) -> KeptRound:
        return KeptRound(entry["round"], why, validation_score(entry), validation_loss(entry))

    last = completed[-1]
    if rule == "last":
        return kept(last, "last")
    if rule == "best-loss":
        rate, sign, why = validation_loss, -1.0, "lowest validation loss"
    else:
        rate, sign, why = validation_score, 1.0, "best validation AUROC + AUPRC"
    rated = [(sign * value, entry) for entry in completed if (value := rate(entry)) is not None]
    if not rated:
        log.warning("keep-round %s: no site reported validation metrics; keeping the last round", rule)
        return kept(last, "last (no site reported validation metrics)")
    _, best = max(rated, key=lambda pair: (pair[0], -pair[1]["round"]))  # ties: the earlier round
    return kept(best, why)


def with_averaged_rounds(history: list[dict[str, Any]], kept: KeptRound, count: int) -> KeptRound:
    """``kept`` with the rounds ``average-rounds count`` averages: the last ``count`` completed
    rounds up to the kept one (fewer where fewer completed). Failed rounds left the model as it
    was, so they do not count; with one round there is nothing to average."""
    completed = [e["round"] for e in history if "failed" not in e and e["round"] <= kept.round]
    window = tuple(completed[-count:])
    return dataclasses.replace(kept, averaged_rounds=window if len(window) > 1 else ())


def average_weights(rounds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The element-wise mean of several rounds' global models, in each array's own dtype (integer
    arrays, such as counters, are the last round's)."""
    last = rounds[-1]
    return {
        name: np.mean([r[name] for r in rounds], axis=0, dtype=np.float64).astype(value.dtype)
        if np.issubdtype(value.dtype, np.floating)
        else value
        for name, value in last.items()
    }
