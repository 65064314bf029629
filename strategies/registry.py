"""Aggregation strategies by name: Flower's own, configured for clinical federations.

A strategy is named (``fedavg``, ``krum``, ...) or given as ``module:Class`` for a user's
own subclass of ``flwr.serverapp.strategy.Strategy``. Options arrive as strings
(``proximal_mu=0.01``) from a command line or a run config; they are checked against the
constructor's signature and converted to its annotated types, so a typo is an error that
lists what is valid instead of a silently ignored setting.

Central differential privacy wraps a base strategy (``base=NAME``) in one of Flower's wrappers:
server-side clipping, ``dp-fixed`` (fixed clipping norm) or ``dp-adaptive`` (clipping norm
adapted to a target quantile), which trusts the coordinator with every update; or client-side
clipping, ``dp-client-fixed``, where each site clips its own update to the norm the wrapper
sends and the coordinator adds the noise to the sum.

Under secure aggregation the coordinator sees only the example-weighted mean of the sites'
updates, so only strategies that need nothing else can run (``check_secure_aggregation``).
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field

from flwr.serverapp import strategy as flwr_strategies
from flwr.serverapp.strategy import Strategy

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": flwr_strategies.FedAvg,
    "fedprox": flwr_strategies.FedProx,
    "fedadam": flwr_strategies.FedAdam,
    "fedyogi": flwr_strategies.FedYogi,
    "fedadagrad": flwr_strategies.FedAdagrad,
    "fedavgm": flwr_strategies.FedAvgM,
    "fedmedian": flwr_strategies.FedMedian,
    "fedtrimmedavg": flwr_strategies.FedTrimmedAvg,
    "krum": flwr_strategies.Krum,
    "multikrum": flwr_strategies.MultiKrum,
    "bulyan": flwr_strategies.Bulyan,
    "qfedavg": flwr_strategies.QFedAvg,
}

CENTRAL_DP_WRAPPERS: dict[str, type[Strategy]] = {
    "dp-fixed": flwr_strategies.DifferentialPrivacyServerSideFixedClipping,
    "dp-adaptive": flwr_strategies.DifferentialPrivacyServerSideAdaptiveClipping,
    "dp-client-fixed": flwr_strategies.DifferentialPrivacyClientSideFixedClipping,
}

#: What each strategy that cannot run under secure aggregation needs from single updates.
NEEDS_SINGLE_UPDATES: dict[str, str] = {
    "fedmedian": "takes the coordinate-wise median of the single updates",
    "fedtrimmedavg": "drops the largest and smallest single updates before averaging",
    "krum": "scores every single update by its distance to the others",
    "multikrum": "scores every single update by its distance to the others",
    "bulyan": "selects single updates by Krum and trims them",
    "qfedavg": "weights every site by its own loss and update norm",
    "dp-fixed": "clips every single update at the coordinator (use dp-client-fixed: the sites clip)",
    "dp-adaptive": "clips every single update at the coordinator and counts the clipped ones",
}
#: Strategies whose aggregation is a function of the weighted sum alone (and subclasses of them).
WEIGHTED_SUM_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "dp-client-fixed")

# Set by the federation, not by users: how many sites must take part, and record keys.
MANAGED_OPTIONS = frozenset(
    {
        "min_train_nodes",
        "min_evaluate_nodes",
        "min_available_nodes",
        "weighted_by_key",
        "arrayrecord_key",
        "configrecord_key",
        "train_metrics_aggr_fn",
        "evaluate_metrics_aggr_fn",
        "strategy",
        "accountant",
        "selection_rule",
    }
)

# Our own defaults where Flower's assume many cheap clients: QFedAvg's required client
# learning rate matches the local AdamW step size of hymate.train.
DEFAULT_OPTIONS: dict[str, dict[str, object]] = {"qfedavg": {"client_learning_rate": 1e-3}}


class StrategyError(ValueError):
    """An unknown strategy or option, or an option value of the wrong type."""


@dataclass(frozen=True)
class StrategySpec:
    """What a coordinator asked for: a name (or ``module:Class``) and string options."""

    name: str = "fedavg"
    options: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, name: str, options: str | list[str] | None) -> StrategySpec:
        """From ``name`` and ``"k=v k2=v2"`` (or a list of ``k=v``), as CLIs and run configs give them."""
        items = options.split() if isinstance(options, str) else list(options or [])
        parsed: dict[str, str] = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise StrategyError(f"strategy option {item!r} is not of the form key=value")
            parsed[key.strip().replace("-", "_")] = value.strip()
        return cls(name.strip(), parsed)

    def as_string(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.options.items())


def available() -> list[str]:
    return sorted(STRATEGIES) + sorted(CENTRAL_DP_WRAPPERS)


def resolve_class(name: str) -> type[Strategy]:
    """The class for a registered name or a ``module:Class`` reference."""
    key = name.lower()
    if key in STRATEGIES:
        return STRATEGIES[key]
    if key in CENTRAL_DP_WRAPPERS:
        return CENTRAL_DP_WRAPPERS[key]
    if ":" in name:
        module_name, _, class_name = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as e:
            raise StrategyError(f"cannot load strategy {name!r}: {e}") from e
        if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
            raise StrategyError(f"{name!r} is not a subclass of flwr.serverapp.strategy.Strategy")
        return cls
    raise StrategyError(f"unknown strategy {name!r}; valid: {', '.join(available())}, or module:Class")


def check_secure_aggregation(spec: StrategySpec) -> None:
    """StrategyError unless ``spec`` (and the base it wraps) needs only the weighted sum of the updates."""
    names = [spec.name]
    if spec.name.lower() in CENTRAL_DP_WRAPPERS:
        names.append(spec.options.get("base", "fedavg"))
    for name in names:
        why = NEEDS_SINGLE_UPDATES.get(name.lower())
        if why is None and name.lower() not in WEIGHTED_SUM_STRATEGIES:
            allowed = tuple(STRATEGIES.get(n) or CENTRAL_DP_WRAPPERS[n] for n in WEIGHTED_SUM_STRATEGIES)
            cls = resolve_class(name)
            if not issubclass(cls, allowed):
                why = "is not a subclass of a weighted-sum strategy, so it may need single updates"
        if why is not None:
            raise StrategyError(
                f"strategy {name!r} cannot run under secure aggregation: the coordinator sees only the weighted "
                f"sum of the sites' updates, and {name} {why}; use one of {', '.join(WEIGHTED_SUM_STRATEGIES)}"
            )


def build_strategy(spec: StrategySpec, min_clients: int) -> Strategy:
    """Instantiate the strategy of ``spec``, waiting for ``min_clients`` sites in every round."""
    if min_clients < 1:
        raise StrategyError(f"min_clients must be at least 1, got {min_clients}")
    cls = resolve_class(spec.name)
    options = dict(spec.options)
    if cls in CENTRAL_DP_WRAPPERS.values():
        base_name = options.pop("base", "fedavg")
        if base_name.lower() in CENTRAL_DP_WRAPPERS:
            raise StrategyError("a central-DP wrapper cannot wrap another one")
        kwargs = _convert(cls, spec.name, options, skip=MANAGED_OPTIONS)
        kwargs.setdefault("num_sampled_clients", min_clients)
        return cls(build_strategy(StrategySpec(base_name, {}), min_clients), **kwargs)
    kwargs = DEFAULT_OPTIONS.get(spec.name.lower(), {}) | _convert(cls, spec.name, options, skip=MANAGED_OPTIONS)
    accepted = inspect.signature(cls.__init__).parameters
    for managed in ("min_train_nodes", "min_evaluate_nodes", "min_available_nodes"):
        if managed in accepted:
            kwargs[managed] = min_clients
    return cls(**kwargs)


def _convert(cls: type, name: str, options: Mapping[str, str], skip: frozenset[str]) -> dict[str, object]:
    """Options as typed keyword arguments of ``cls``; unknown or badly typed ones are errors."""
    params = {
        p.name: p
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in skip
    }
    hints = typing.get_type_hints(cls.__init__)
    kwargs: dict[str, object] = {}
    for key, raw in options.items():
        if key not in params:
            valid = ", ".join(sorted(params)) or "none"
            raise StrategyError(f"unknown option {key!r} for strategy {name!r}; valid options: {valid}")
        kwargs[key] = _parse_value(raw, hints.get(key, str), f"{name}.{key}")
    return kwargs


def _parse_value(raw: str, annotation: object, where: str) -> object:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if raw.lower() in ("none", "null"):
            return None
        annotation = args[0] if args else str
    try:
        if annotation is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        if annotation in (int, float, str):
            return annotation(raw)
    except ValueError:
        raise StrategyError(f"option {where}={raw!r} is not a valid {annotation.__name__}") from None
    raise StrategyError(f"option {where} cannot be set from text")
