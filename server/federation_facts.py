"""What the coordinator learns before round 1 and keeps for the whole run (and resume).

Its own module so that the round loop (``server.federation``) that learns the facts and the
model card (``server.model_card``) that reports them both import it, and neither the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hymate.data.normalization import Normalizer


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

    def build_normalizer(self) -> Normalizer:
        return Normalizer.from_arrays({k: np.asarray(v) for k, v in self.normalizer.items()})
