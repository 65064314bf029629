"""A hospital's local data and settings, loaded and validated once per process.

Everything a site uses comes from flags or a config file the site controls (Flower's
``node_config``), never from the coordinator: which data, where the state lives, which
device, and (for privacy) its budget.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from hymate.data import VOCABULARIES, DataError, LoadSummary, VocabularyChoice, load_dataset, split_stays
from hymate.data.stays import StayTable
from hymate.privacy.calibration import ACCOUNTANTS, DPConfig
from hymate.settings_fields import add_flags, config_key, default_of, dest_of, field_kind, flag_values, setting

log = logging.getLogger(__name__)


class SiteConfigError(ValueError):
    """A node_config key is missing or has the wrong type; names the key."""


def _finite_positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


# What a site's privacy settings must satisfy, by option (flag ``--dp-epsilon``, node-config key
# ``dp-epsilon``), checked wherever they enter (flags, config file, node config): a bad value is a
# start-up error, never a silent "train without DP".
SETTING_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "dp_epsilon": (_finite_positive, "must be a finite number > 0"),
    "dp_delta": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "dp_max_grad_norm": (_finite_positive, "must be a finite number > 0"),
    "dp_planned_rounds": (lambda v: v >= 1, "must be at least 1"),
    "dp_accountant": (lambda v: v in ACCOUNTANTS, f"must be one of {', '.join(ACCOUNTANTS)}"),
    "dp_clip_quantile": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "dp_clip_learning_rate": (_finite_positive, "must be a finite number > 0"),
}

# Node-config keys and flags of releases before the dp- prefix; still read, with a deprecation line.
DEPRECATED_DP_KEYS = {"epsilon": "dp-epsilon", "delta": "dp-delta", "max-grad-norm": "dp-max-grad-norm"}

# Keys Flower itself may put into a node config (simulation); every other key must be one of ours,
# so that a misspelt key (``epsilom=8``) is an error instead of a site that trains without DP.
FLOWER_NODE_CONFIG_KEYS = frozenset({"partition-id", "num-partitions"})


@dataclass(frozen=True)
class DPSettings:
    """A site's own privacy budget and how it is spent; never the coordinator's to set.

    The fields are the site's ``--dp-*`` flags and ``dp-*`` node-config keys.
    """

    epsilon: float = setting(key="dp-epsilon", help="privacy budget over the site's whole life (> 0); enables DP-SGD")
    delta: float = setting(1e-5, key="dp-delta", help="delta of (epsilon, delta)-DP, in (0, 1)")
    # DP's per-sample clip (not the optimiser's clip-grad-norm of the run config).
    max_grad_norm: float = setting(1.0, key="dp-max-grad-norm", help="per-sample gradient clipping bound, > 0")
    accountant: str = setting("rdp", key="dp-accountant", choices=tuple(ACCOUNTANTS), help="privacy accountant")
    planned_rounds: int | None = setting(
        None, key="dp-planned-rounds", help="rounds to calibrate noise for, >= 1 (default: the coordinator's plan)"
    )
    clip_quantile: float | None = setting(
        None,
        key="dp-clip-quantile",
        help="adapt the clipping bound (from --dp-max-grad-norm on, kept between rounds) so that this share of "
        "per-sample gradients is left unclipped, in (0, 1) (Andrew et al. 2021; default: a fixed bound)",
    )
    clip_learning_rate: float = setting(
        0.2,
        key="dp-clip-learning-rate",
        help="how fast an adaptive bound moves: times exp(-rate * (unclipped share - quantile)) a step, > 0",
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_dp_setting(config_key(f), getattr(self, f.name))

    def for_rounds(self, planned_rounds: int) -> DPConfig:
        """The calibration input for a federation planned to last ``planned_rounds`` rounds
        (the site's own ``planned_rounds`` wins)."""
        return DPConfig(
            target_epsilon=self.epsilon,
            delta=self.delta,
            max_grad_norm=self.max_grad_norm,
            accountant=self.accountant,
            planned_rounds=self.planned_rounds if self.planned_rounds is not None else planned_rounds,
            clip_quantile=self.clip_quantile,
            clip_learning_rate=self.clip_learning_rate,
        )


def add_dp_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, given_only: bool = False) -> None:
    """The ``--dp-*`` flags, derived from DPSettings (``given_only``: every default None, so a value
    given as 0 is told apart from one not given)."""
    add_flags(parser, DPSettings, defaults={f.name: None for f in fields(DPSettings)} if given_only else None)


def dp_settings_from(options: Mapping[str, Any]) -> DPSettings | None:
    """DPSettings from parsed options (by flag destination); None when no ``--dp-epsilon`` was given."""
    given = argparse.Namespace(**{dest_of(f): None for f in fields(DPSettings)} | dict(options))
    values = {k: v for k, v in flag_values(DPSettings, given).items() if v is not None}
    if "epsilon" not in values:
        for f in fields(DPSettings):  # a bad value is an error even without an epsilon
            _check_dp_setting(config_key(f), values.get(f.name))
        return None
    return DPSettings(**values)


def _check_dp_setting(key: str, value: Any) -> None:
    valid, rule = SETTING_RULES[key.replace("-", "_")]
    if value is not None and not valid(value):
        raise SiteConfigError(f"{key}={value!r} {rule} (hymate-client --{key}, node config {key!r})")


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
    dp: DPSettings | None = None  # None: train without DP
    secure_aggregation: bool = False  # send updates and normalisation sums only masked (SecAgg+)
    # How the site reads its data: its source's own names and units, or the shared clinical
    # vocabulary (every site of a federation must read the same; the coordinator checks).
    vocabulary: str = default_of(VocabularyChoice, "vocabulary")

    def __post_init__(self) -> None:
        if self.vocabulary not in VOCABULARIES:
            raise SiteConfigError(
                f"vocabulary={self.vocabulary!r} must be one of {', '.join(VOCABULARIES)} "
                "(hymate-client --vocabulary, node config 'vocabulary')"
            )

    def privacy(self, planned_rounds: int) -> DPConfig | None:
        """The site's DP settings for a federation planned to last ``planned_rounds`` rounds.

        None only when the site set no epsilon at all; a site with an epsilon gets a DPConfig
        or an error, never None.
        """
        return None if self.dp is None else self.dp.for_rounds(planned_rounds)

    @classmethod
    def from_node_config(cls, config: Mapping[str, Any]) -> SiteSettings:
        """The settings a ``--node-config`` gives; an absent key takes its default.

        A key that is present must hold a valid value: ``dp-epsilon=""`` or ``dp-epsilon="8x"`` is
        an error, not a site without DP, and so is a key this class does not know.
        """
        unknown = set(config) - NODE_CONFIG_KEYS - FLOWER_NODE_CONFIG_KEYS
        if unknown:
            raise SiteConfigError(f"node config has unknown keys {sorted(unknown)}; known: {sorted(NODE_CONFIG_KEYS)}")
        config, written = dict(config), {}  # written: the key as the config spelt it, for errors
        for old, new in DEPRECATED_DP_KEYS.items():
            if old in config:
                log.warning("node config key %r is deprecated; use %r", old, new)
                if new in config:
                    raise SiteConfigError(f"node config has both {old!r} and {new!r}; keep {new!r}")
                config[new] = config.pop(old)
                written[new] = old

        def get(key: str, kind: type, default: Any = None, required: bool = False) -> Any:
            if key not in config:
                if required:
                    raise SiteConfigError(f"node config lacks {key!r} (hymate-client --{key})")
                return default
            value = config[key]
            invalid = SiteConfigError(f"node config {written.get(key, key)!r}={value!r} is not a valid {kind.__name__}")
            if isinstance(value, bool) or value is None or (isinstance(value, str) and not value.strip()):
                raise invalid
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise invalid
            try:
                return kind(value) if kind is not Path else Path(str(value)).expanduser()
            except (TypeError, ValueError):
                raise invalid from None

        dp_values = {f.name: get(config_key(f), field_kind(DPSettings, f.name)) for f in fields(DPSettings)}
        return cls(
            dataset=get("dataset", str, required=True),
            state_dir=get("state-dir", Path, required=True),
            data=get("data", Path),
            site=get("site", str),
            device=get("device", str, "auto"),
            split_seed=get("split-seed", int, 0),
            name=get("name", str),
            secure_aggregation=node_config_flag(config, "secure-aggregation"),
            vocabulary=get("vocabulary", str, default_of(VocabularyChoice, "vocabulary")),
            dp=dp_settings_from({dest_of(f): dp_values[f.name] for f in fields(DPSettings)}),
        )

    @property
    def display_name(self) -> str:
        return self.name or self.site or self.dataset


def node_config_flag(config: Mapping[str, Any], key: str) -> bool:
    """A yes/no node-config key: true or false (TOML), or the text "true"/"false" (``--node-config``)."""
    value = config.get(key, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise SiteConfigError(f"node config {key!r}={value!r} must be true or false")


NODE_CONFIG_KEYS = frozenset(
    {"dataset", "state-dir", "data", "site", "device", "split-seed", "name", "secure-aggregation", "vocabulary"}
    | {config_key(f) for f in fields(DPSettings)}
    | set(DEPRECATED_DP_KEYS)
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
            "positives_train": int(self.train.labels.sum()),
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
    table = load_dataset(
        settings.dataset,
        settings.data,
        cache_dir=settings.state_dir / "parsed",
        summary=summary,
        vocabulary=settings.vocabulary,
    )
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
