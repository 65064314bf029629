"""What the coordinator learns before round 1 and keeps for the whole run (and resume).

Its own module so that the round loop (``server.federation``) that learns the facts and the
model card (``server.model_card``) that reports them both import it, and neither the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hymate.data.normalization import Normalizer
from hymate.train import class_weight_of


@dataclass
class FederationFacts:
    """The schema and normaliser the sites agreed on, and who the run's members are."""

    variables: list[str]
    static_names: list[str]
    dataset: str
    normalizer: dict[str, list[float] | float]
    #: Provenance of exactly the sites whose moments shaped the normaliser: the run's members.
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: How each member's identity was established ("registered key" or self-reported).
    identities: dict[str, str] = field(default_factory=dict)
    #: Normalisation replies that were not used, with the reason.
    query_rejections: list[dict[str, Any]] = field(default_factory=list)

    def _training_counts(self) -> list[tuple[int, int]] | None:
        """(positives, stays) of each member's training stays, or None when one did not report them."""
        counts = [(p.get("positives_train"), p.get("stays_train")) for p in self.sites.values()]
        if not counts or any(not isinstance(x, (int, float)) for pair in counts for x in pair):
            return None
        return [(int(k), int(n)) for k, n in counts]

    def positive_class_weight(self) -> float | None:
        """The positive class's loss weight over all members' training stays (the centralized
        model's), or None when a member did not report its training positives."""
        counts = self._training_counts()
        return None if counts is None else class_weight_of(sum(k for k, _ in counts), sum(n for _, n in counts))

    def sites_class_weight(self) -> float | None:
        """What the global model's head holds when each site trains with its own weight: their
        geometric mean over training stays (FedAvg averages the sites' head biases by examples,
        and each site's weighting lifted its own by log w), or None when a count is missing."""
        counts = self._training_counts()
        stays = sum(n for _, n in counts) if counts else 0
        if not stays:
            return None
        return math.exp(sum(n * math.log(class_weight_of(k, n)) for k, n in counts) / stays)

    def build_normalizer(self) -> Normalizer:
        return Normalizer.from_arrays({k: np.asarray(v) for k, v in self.normalizer.items()})
