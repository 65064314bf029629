"""The coordinator's settings: one typed object built from Flower's run config.

Every key is declared once, with its default, as a field here (the model's in ``ModelOptions``,
the optimisation defaults in ``TrainConfig``); the run-config keys and ``hymate-server``'s flags
are derived from the fields. Flower also needs them in ``[tool.flwr.app.config]`` of
pyproject.toml, and a test holds that table to these fields. The same object is built
in-process by the simulator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from hymate.local_plan import LocalPlan
from hymate.model import FREEZE_CHOICES, ModelOptions
from hymate.model_bundle import Initialisation
from hymate.settings_fields import RunConfigError, check_choices, config_key, default_of, from_run_config, setting
from hymate.train import OPTIMIZERS
from server.federation_facts import FederationFacts
from server.round_selection import RoundSelection
from server.secure_aggregation import SecureAggregationSettings
from strategies.registry import StrategyError, StrategySpec, check_secure_aggregation

CLASS_WEIGHTS = ("federation", "site", "none")
LR_SCHEDULES = ("constant", "cosine")


def fixed_class_weight(choice: str) -> float | None:
    """The positive class's loss weight a ``--class-weight`` choice fixes: 1 (unweighted) for
    ``none``; None where it comes from labels (a site's own, or the federation's counts)."""
    return 1.0 if choice == "none" else None


SettingsError = RunConfigError  # a run-config key has a wrong type or value; names the key


def _plan_default(name: str) -> Any:
    return default_of(LocalPlan, name)


@dataclass(frozen=True)
class ServerSettings:
    """Every run-config key is a field here (``hymate.settings_fields`` derives keys and flags)."""

    strategy_name: str = setting("fedavg", key="strategy", help="registered name or module:Class")
    strategy_options: str = setting("", key="strategy-options")  # space-separated KEY=VALUE
    rounds: int = setting(3, key="num-server-rounds", flag="--rounds", help="federated rounds")
    min_clients: int = setting(2, help="sites that must reply in every round")
    #: Sites that must be connected before the normalisation query and each round start.
    #: 0 (the default): the query waits for every registered site when the coordinator
    #: registered site keys (``registered_sites``), else for min_clients; rounds wait for
    #: min_clients. Above min_clients, a round waits for sites that are expected back (after
    #: a coordinator restart, say) while still closing with min_clients replies.
    min_connected: int = setting(
        0,
        help="sites to wait for before the normalisation query and each round (0: every site in "
        "--site-keys before the query, --min-clients before a round)",
    )
    #: The names the coordinator registered site keys under (hymate-server fills it in from
    #: ``--site-keys``); empty in simulation and --insecure runs.
    registered_sites: tuple[str, ...] = ()
    run_dir: Path = setting(Path("runs/federation"), help="checkpoints, logs, final model and model card")
    resume: bool = setting(False, help="continue the run in --run-dir after its last complete round")
    round_timeout: float = setting(600.0, help="seconds to wait for replies per round")
    wait_for_clients: float = setting(300.0, help="seconds to wait for enough sites")
    model: ModelOptions = setting(default_factory=ModelOptions, group=True)
    local_epochs: int = setting(_plan_default("local_epochs"))
    batch_size: int = setting(_plan_default("batch_size"))
    learning_rate: float = setting(_plan_default("learning_rate"), help="learning rate of the sites' optimiser")
    optimizer: str = setting(
        _plan_default("optimizer"), choices=OPTIMIZERS, help="the sites' optimiser: AdamW or SGD with momentum"
    )
    momentum: float = setting(_plan_default("momentum"), help="momentum of --optimizer sgd")
    weight_decay: float = setting(_plan_default("weight_decay"))
    clip_grad_norm: float = setting(
        _plan_default("clip_grad_norm"), help="the optimiser's gradient-norm clip (not DP's per-sample clip)"
    )
    max_events: int = setting(_plan_default("max_events"), help="events kept per stay")
    seed: int = setting(_plan_default("seed"))
    local_norms: bool = setting(
        _plan_default("local_norms"), help="FedBN: every site keeps its own normalisation layers"
    )
    keep_optimizer_state: bool = setting(
        _plan_default("keep_optimizer_state"),
        help="every site continues its optimiser's state (AdamW's moments, SGD's momentum) from round to round",
    )
    secure_aggregation: SecureAggregationSettings = setting(default_factory=SecureAggregationSettings, group=True)
    freeze: str = setting(
        _plan_default("freeze"),
        choices=FREEZE_CHOICES,
        help="keep this part of the --init-from model fixed at every site (embeddings: the triplet "
        "embeddings; backbone: embeddings, Mamba and attention blocks)",
    )
    initialisation: Initialisation = setting(default_factory=Initialisation, group=True)
    lr_schedule: str = setting(
        "constant",
        choices=LR_SCHEDULES,
        help="the sites' learning rate over the rounds: constant, or cosine from --learning-rate in round 1 "
        "towards 0 after the last (the annealing centralized training does over its epochs)",
    )
    class_weight: str = setting(
        "federation",
        choices=CLASS_WEIGHTS,
        help="the positive class's loss weight sqrt(negatives / positives): one for every site from the "
        "federation's training label counts (the centralized model's objective), or each site's own; or none, "
        "the unweighted loss (either way the saved model's risks are probabilities: the weight's log is taken off its head)",
    )
    selection: RoundSelection = setting(default_factory=RoundSelection, group=True)
    #: Set by hymate-sim: the partitions its virtual sites hold (empty for real deployments).
    simulation_manifest: str = ""

    def __post_init__(self) -> None:
        for name in ("rounds", "min_clients", "local_epochs", "batch_size", "max_events"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{config_key_of(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("round_timeout", "wait_for_clients", "learning_rate"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{config_key_of(name)} must be positive, got {getattr(self, name)}")
        check_choices(self, ("optimizer", "lr_schedule", "class_weight"))
        if not 0 <= self.momentum < 1:
            raise SettingsError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.min_connected < 0:
            raise SettingsError(f"min-connected must not be negative, got {self.min_connected}")
        self.strategy  # noqa: B018  (a malformed strategy option fails here, naming itself)
        if self.secure_aggregation.enabled:
            if self.min_clients < 2:
                raise SettingsError("secure aggregation needs min-clients of at least 2: one site's sum is its update")
            try:
                check_secure_aggregation(self.strategy)
            except StrategyError as e:
                raise SettingsError(str(e)) from None

    @property
    def strategy(self) -> StrategySpec:
        return StrategySpec.parse(self.strategy_name, self.strategy_options)

    @property
    def sites_to_wait_for(self) -> int:
        return max(self.min_clients, self.min_connected)

    @property
    def sites_for_the_query(self) -> tuple[str, ...]:
        """Registered sites the normalisation query waits for by name (none: wait by count)."""
        return self.registered_sites if self.min_connected == 0 else ()

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> ServerSettings:
        return from_run_config(cls, config)

    def plan(self, normalizer, federation_pos_weight: float | None) -> LocalPlan:
        """What every site is asked to do each round: the fields LocalPlan shares with these
        settings, and the federation's positive class weight unless each site is to use its own
        (or a member did not report its training positives)."""
        mine = {f.name for f in fields(self)}
        shared = {f.name: getattr(self, f.name) for f in fields(LocalPlan) if f.name in mine}
        pos_weight = self.plan_pos_weight(federation_pos_weight)
        return LocalPlan(normalizer=normalizer, planned_rounds=self.rounds, pos_weight=pos_weight, **shared)

    def learning_rate_at(self, server_round: int) -> float:
        """The sites' learning rate in ``server_round`` (1-based): the cosine schedule's value at
        the round's start, so round 1 trains at the full rate and the last at a small one."""
        if self.lr_schedule == "constant":
            return self.learning_rate
        return self.learning_rate * 0.5 * (1 + math.cos(math.pi * (server_round - 1) / self.rounds))

    def plan_pos_weight(self, federation_pos_weight: float | None) -> float:
        """The weight the plan sends: the federation's, 1 (unweighted), or 0 (each site's own)."""
        fixed = fixed_class_weight(self.class_weight)
        if fixed is not None:
            return fixed
        return federation_pos_weight if self.class_weight == "federation" and federation_pos_weight else 0.0

    def trained_class_weight(self, facts: FederationFacts) -> float | None:
        """The class weight the global model's head holds, which the saved model takes out of its
        risks (``remove_class_weight``): the plan's, or where each site used its own, their mean;
        None when a site's counts are unknown (the risks then keep the weight's offset)."""
        planned = self.plan_pos_weight(facts.positive_class_weight())
        return planned if planned > 0 else facts.sites_class_weight()


def config_key_of(name: str) -> str:
    """The run-config key of a ServerSettings field (error messages name the key a user writes)."""
    return config_key({f.name: f for f in fields(ServerSettings)}[name])
