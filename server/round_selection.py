"""Which round's model a federation ends with: the last, or the one the sites' validation stays rate best.

Centralized training stops early on validation AUROC + AUPRC (``hymate.train.fit``). A
federation without the same rule is judged at whatever round its plan ends on, often after its
best: on PhysioNet 2012's ICU types the global model peaked at round 6 of 10. Every site reports
the global model's AUROC and AUPRC on its own validation stays (aggregates, like the test
metrics beside them); ``keep-round best`` keeps the round whose mean of those over the sites,
weighted by their validation stays, is highest. The test stays never choose the model they score.

A site could misreport its validation metrics to sway the choice among the run's rounds, as it
can misreport its test metrics; screening (``server.screening``) only bounds them to [0, 1].
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from hymate.settings_fields import check_choices, setting

log = logging.getLogger(__name__)

KEEP_ROUNDS = ("last", "best")
VALIDATION_METRICS = ("val-auroc", "val-auprc")
VALIDATION_EXAMPLES = "val-num-examples"


@dataclass(frozen=True)
class RoundSelection:
    """The one declaration of the ``--keep-round`` flag and run-config key."""

    keep_round: str = setting(
        "last",
        choices=KEEP_ROUNDS,
        help="the model the run ends with: the last round's, or (best) the round with the highest mean validation "
        "AUROC + AUPRC over the sites, early stopping as centralized training does",
    )

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass(frozen=True)
class KeptRound:
    """The round whose model the run saved, and why (for the model card)."""

    round: int
    rule: str
    validation_score: float | None  # mean validation AUROC + AUPRC of that round, if reported

    def as_record(self) -> dict[str, Any]:
        return {"round": self.round, "rule": self.rule, "validation_auroc_plus_auprc": self.validation_score}


def validation_score(entry: dict[str, Any]) -> float | None:
    """Validation AUROC + AUPRC of one round: each metric's mean over the sites that define it,
    weighted by their validation stays; None when no site reported one."""
    sites = entry["sites"]["evaluate"].values()
    total = 0.0
    for metric in VALIDATION_METRICS:
        pairs = [
            (float(m[metric]), float(m.get(VALIDATION_EXAMPLES, 0)))
            for m in sites
            if isinstance(m.get(metric), (int, float)) and math.isfinite(m[metric])
        ]
        weight = sum(n for _, n in pairs)
        if weight <= 0:
            return None
        total += sum(v * n for v, n in pairs) / weight
    return total


def kept_round(history: list[dict[str, Any]], rule: str) -> KeptRound:
    """The round to keep from a run's ``history`` (round metrics in order) under ``rule``.

    Failed rounds changed nothing and are kept only when every round failed (the model is then
    the initial one); ``best`` falls back to the last round, saying so, when no round carries
    validation metrics (sites on an older client)."""
    completed = [entry for entry in history if "failed" not in entry]
    if not completed:
        return KeptRound(history[-1]["round"], "last (every round failed: the initial model)", None)
    last = completed[-1]
    if rule == "last":
        return KeptRound(last["round"], "last", validation_score(last))
    scored = [(score, entry["round"]) for entry in completed if (score := validation_score(entry)) is not None]
    if not scored:
        log.warning("keep-round best: no site reported validation metrics; keeping the last round")
        return KeptRound(last["round"], "last (no site reported validation metrics)", None)
    score, best = max(scored, key=lambda pair: (pair[0], -pair[1]))  # ties: the earlier round
    return KeptRound(best, "best validation AUROC + AUPRC", score)
