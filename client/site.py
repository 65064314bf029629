"""A hospital's local data and settings, loaded and validated once per process.

Everything a site uses comes from flags or a config file the site controls (Flower's
``node_config``), never from the coordinator: which data, where the state lives, which
device, and (for privacy) its budget.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from hymate.data import DataError, LoadSummary, load_dataset, split_stays
from hymate.data.stays import StayTable
from hymate.privacy.calibration import ACCOUNTANTS, DPConfig

log = logging.getLogger(__name__)


class SiteConfigError(ValueError):
    """A node_config key is missing or has the wrong type; names the key."""


def _finite_positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


# What a site's privacy settings must satisfy, checked wherever they enter (flags, config file,
# node config): a bad value is a start-up error, never a silent "train without DP".
SETTING_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epsilon": (_finite_positive, "must be a finite number > 0"),
    "delta": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "max_grad_norm": (_finite_positive, "must be a finite number > 0"),
    "dp_planned_rounds": (lambda v: v >= 1, "must be at least 1"),
    "dp_accountant": (lambda v: v in ACCOUNTANTS, f"must be one of {', '.join(ACCOUNTANTS)}"),
}

# Keys Flower itself may put into a node config (simulation); every other key must be one of ours,
# so that a misspelt key (``epsilom=8``) is an error instead of a site that trains without DP.
FLOWER_NODE_CONFIG_KEYS = frozenset({"partition-id", "num-partitions"})


@dataclass(frozen=True)
class SiteSettings:
    """A site's own configuration (``hymate-client`` flags, or ``--node-config`` keys)."""

    dataset: str
    state_dir: Path
    data: Path | None = None
    site: str | None = None  # keep only this site's stays (pilots, tests, simulations)
    device: str = "auto"
    split_seed: int = 0
    name: str | None = None  # how the coordinator's reports name this site
    # Differential privacy: the site's own budget, never the coordinator's to set.
    epsilon: float | None = None  # None: train without DP
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    dp_accountant: str = "rdp"
    dp_planned_rounds: int | None = None  # rounds the noise is calibrated for (default: the coordinator's plan)

    def __post_init__(self) -> None:
        for name, (valid, rule) in SETTING_RULES.items():
            value = getattr(self, name)
            if value is not None and not valid(value):
                key = name.replace("_", "-")
                raise SiteConfigError(f"{key}={value!r} {rule} (hymate-client --{key}, node config {key!r})")

    def privacy(self, planned_rounds: int) -> DPConfig | None:
        """The site's DP settings for a federation planned to last ``planned_rounds`` rounds.

        None only when the site set no epsilon at all; a site with an epsilon gets a DPConfig
        or an error, never None.
        """
        if self.epsilon is None:
            return None
        return DPConfig(
            target_epsilon=self.epsilon,
            delta=self.delta,
            max_grad_norm=self.max_grad_norm,
            accountant=self.dp_accountant,
            planned_rounds=self.dp_planned_rounds if self.dp_planned_rounds is not None else planned_rounds,
        )

    @classmethod
    def from_node_config(cls, config: Mapping[str, Any]) -> SiteSettings:
        """The settings a ``--node-config`` gives; an absent key takes its default.

        A key that is present must hold a valid value: ``epsilon=""`` or ``epsilon="8x"`` is an
        error, not a site without DP, and so is a key this class does not know.
        """
        unknown = set(config) - NODE_CONFIG_KEYS - FLOWER_NODE_CONFIG_KEYS
        if unknown:
            raise SiteConfigError(f"node config has unknown keys {sorted(unknown)}; known: {sorted(NODE_CONFIG_KEYS)}")

        def get(key: str, kind: type, default: Any = None, required: bool = False) -> Any:
            if key not in config:
                if required:
                    raise SiteConfigError(f"node config lacks {key!r} (hymate-client --{key})")
                return default
            value = config[key]
            invalid = SiteConfigError(f"node config {key!r}={value!r} is not a valid {kind.__name__}")
            if isinstance(value, bool) or value is None or (isinstance(value, str) and not value.strip()):
                raise invalid
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise invalid
            try:
                return kind(value) if kind is not Path else Path(str(value)).expanduser()
            except (TypeError, ValueError):
                raise invalid from None

        return cls(
            dataset=get("dataset", str, required=True),
            state_dir=get("state-dir", Path, required=True),
            data=get("data", Path),
            site=get("site", str),
            device=get("device", str, "auto"),
            split_seed=get("split-seed", int, 0),
            name=get("name", str),
            epsilon=get("epsilon", float),
            delta=get("delta", float, 1e-5),
            max_grad_norm=get("max-grad-norm", float, 1.0),
            dp_accountant=get("dp-accountant", str, "rdp"),
            dp_planned_rounds=get("dp-planned-rounds", int),
        )

    @property
    def display_name(self) -> str:
        return self.name or self.site or self.dataset


NODE_CONFIG_KEYS = frozenset(
    {
        "dataset",
        "state-dir",
        "data",
        "site",
        "device",
        "split-seed",
        "name",
        "epsilon",
        "delta",
        "max-grad-norm",
        "dp-accountant",
        "dp-planned-rounds",
    }
)


@dataclass(frozen=True)
class LocalData:
    """A site's stays split into train/val/test (patient-level, stratified, by seed)."""

    settings: SiteSettings
    train: StayTable
    val: StayTable
    test: StayTable
    summary: LoadSummary = field(repr=False)

    @property
    def schema(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return self.train.variables, self.train.static_names

    def local_ids(self) -> frozenset[str]:
        """Every stay and patient id of the site: text that must never leave it."""
        tables = (self.train, self.val, self.test)
        return frozenset(str(x) for t in tables for x in np.concatenate([t.stay_ids, t.patient_ids]))

    def provenance(self) -> dict[str, Any]:
        """Aggregate facts for the model card: counts and rates only, no record of any patient."""
        labels = np.concatenate([self.train.labels, self.val.labels, self.test.labels])
        return {
            "dataset": self.settings.dataset,
            "stays_train": len(self.train),
            "stays_val": len(self.val),
            "stays_test": len(self.test),
            "prevalence": round(float(labels.mean()), 3) if len(labels) else 0.0,
            "events": self.train.n_events + self.val.n_events + self.test.n_events,
        }


@cache
def open_site(settings: SiteSettings) -> LocalData:
    """Load, validate and split the site's data (cached for the life of the process)."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    summary = LoadSummary(source=settings.dataset)
    table = load_dataset(settings.dataset, settings.data, cache_dir=settings.state_dir / "parsed", summary=summary)
    if settings.site is not None:
        if settings.site not in table.site_names():
            raise DataError(
                f"site {settings.site!r} is not in dataset {settings.dataset!r}; it has {', '.join(table.site_names())}"
            )
        table = table.where_site(settings.site)
    if len(table) == 0:
        raise DataError(f"dataset {settings.dataset!r} at {settings.data} holds no stays")
    train, val, test = split_stays(table, seed=settings.split_seed).tables(table)
    log.info(
        "site %s: %s; %d train, %d val, %d test stays", settings.display_name, summary, len(train), len(val), len(test)
    )
    return LocalData(settings, train, val, test, summary)
