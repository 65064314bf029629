"""The coordinator's settings: one typed object built from Flower's run config.

Every key is declared once, with its default, in ``[tool.flwr.app.config]`` of
pyproject.toml; ``hymate-server`` flags and ``flwr run --run-config`` override them. The
same object is built in-process by the simulator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hymate.local_plan import LocalPlan
from hymate.model import ModelOptions
from strategies.registry import StrategySpec


class SettingsError(ValueError):
    """A run-config key has a wrong type or value; names the key."""


@dataclass(frozen=True)
class ServerSettings:
    strategy: StrategySpec = field(default_factory=StrategySpec)
    rounds: int = 3
    min_clients: int = 2
    #: Sites that must be connected before the normalisation query and each round start.
    #: 0 (the default): the query waits for every registered site when the coordinator
    #: registered site keys (``registered_sites``), else for min_clients; rounds wait for
    #: min_clients. Above min_clients, a round waits for sites that are expected back (after
    #: a coordinator restart, say) while still closing with min_clients replies.
    min_connected: int = 0
    #: The names the coordinator registered site keys under (hymate-server fills it in from
    #: ``--site-keys``); empty in simulation and --insecure runs.
    registered_sites: tuple[str, ...] = ()
    run_dir: Path = Path("runs/federation")
    resume: bool = False
    round_timeout: float = 600.0
    wait_for_clients: float = 300.0
    model: ModelOptions = field(default_factory=ModelOptions)
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    max_grad_norm: float = 1.0
    max_events: int = 880
    seed: int = 0
    local_norms: bool = False  # FedBN: sites keep their normalisation layers

    def __post_init__(self) -> None:
        for name in ("rounds", "min_clients", "local_epochs", "batch_size", "max_events"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("round_timeout", "wait_for_clients", "learning_rate"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.min_connected < 0:
            raise SettingsError(f"min-connected must not be negative, got {self.min_connected}")

    @property
    def sites_to_wait_for(self) -> int:
        return max(self.min_clients, self.min_connected)

    @property
    def sites_for_the_query(self) -> tuple[str, ...]:
        """Registered sites the normalisation query waits for by name (none: wait by count)."""
        return self.registered_sites if self.min_connected == 0 else ()

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> ServerSettings:
        defaults = cls()

        def get(key: str, default: Any) -> Any:
            value = config.get(key, default)
            kind = type(default)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if isinstance(default, Path):
                return Path(str(value))
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise SettingsError(f"run config {key!r}={value!r} must be {kind.__name__}")
            return value

        model = ModelOptions(
            d_model=get("d-model", defaults.model.d_model),
            n_mamba_layers=get("mamba-layers", defaults.model.n_mamba_layers),
            d_state=get("d-state", defaults.model.d_state),
            n_attention_layers=get("attention-layers", defaults.model.n_attention_layers),
            n_heads=get("heads", defaults.model.n_heads),
            dropout=get("dropout", defaults.model.dropout),
            scan_backend=get("scan-backend", defaults.model.scan_backend),
        )
        return cls(
            strategy=StrategySpec.parse(get("strategy", "fedavg"), get("strategy-options", "")),
            rounds=get("num-server-rounds", defaults.rounds),
            min_clients=get("min-clients", defaults.min_clients),
            min_connected=get("min-connected", defaults.min_connected),
            registered_sites=tuple(get("registered-sites", "").split()),
            run_dir=get("run-dir", defaults.run_dir),
            resume=get("resume", defaults.resume),
            round_timeout=get("round-timeout", defaults.round_timeout),
            wait_for_clients=get("wait-for-clients", defaults.wait_for_clients),
            model=model,
            local_epochs=get("local-epochs", defaults.local_epochs),
            batch_size=get("batch-size", defaults.batch_size),
            learning_rate=get("learning-rate", defaults.learning_rate),
            weight_decay=get("weight-decay", defaults.weight_decay),
            max_grad_norm=get("max-grad-norm", defaults.max_grad_norm),
            max_events=get("max-events", defaults.max_events),
            seed=get("seed", defaults.seed),
            local_norms=get("local-norms", defaults.local_norms),
        )

    def plan(self, normalizer) -> LocalPlan:
        """What every site is asked to do each round."""
        return LocalPlan(
            model=self.model,
            normalizer=normalizer,
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
            max_events=self.max_events,
            seed=self.seed,
            planned_rounds=self.rounds,
            local_norms=self.local_norms,
        )
