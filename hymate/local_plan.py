"""What a coordinator asks a site to do in a round, as a flat record of numbers and text.

The coordinator sends a ``LocalPlan`` with every training and evaluation request, so a site
needs nothing but its own data and this plan: the model's shape, the local optimisation
settings and the global normalisation statistics. Flat keys of ints, floats, strings and
lists of floats fit any transport (a Flower ConfigRecord here) and are validated on arrival,
because a site must not trust what comes over the network.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from hymate.data.normalization import Normalizer
from hymate.model import FREEZE_CHOICES, ModelOptions
from hymate.settings_fields import default_of, setting
from hymate.train import TrainConfig


class PlanError(ValueError):
    """A received plan is missing a field or carries a value of the wrong kind."""


@dataclass(frozen=True)
class LocalPlan:
    """Model shape, local training settings and the global normaliser for one round."""

    model: ModelOptions
    normalizer: Normalizer
    local_epochs: int = setting(1, help="epochs each site trains per round")
    # The optimisation settings take TrainConfig's defaults: each is declared there once.
    batch_size: int = setting(default_of(TrainConfig, "batch_size"))
    learning_rate: float = setting(
        default_of(TrainConfig, "learning_rate"), help="learning rate of the local optimiser"
    )
    optimizer: str = setting(default_of(TrainConfig, "optimizer"), help="local optimiser: adamw or sgd (with momentum)")
    momentum: float = setting(default_of(TrainConfig, "momentum"), help="momentum of optimizer sgd")
    weight_decay: float = setting(default_of(TrainConfig, "weight_decay"))
    clip_grad_norm: float = setting(
        default_of(TrainConfig, "clip_grad_norm"),
        help="the optimiser's gradient-norm clip (a DP site clips per sample by its own --dp-max-grad-norm)",
    )
    max_events: int = setting(default_of(TrainConfig, "max_events"), help="events kept per stay")
    seed: int = setting(default_of(TrainConfig, "seed"))
    planned_rounds: int = 1  # how long the federation is planned to last (DP sites calibrate noise to it)
    #: The positive class's loss weight, the same at every site (from the federation's training
    #: label counts, so that FedAvg minimises the centralized objective); 0: each site its own.
    pos_weight: float = 0.0
    local_norms: bool = setting(False, help="FedBN: every site keeps its own normalisation layers")
    keep_optimizer_state: bool = setting(
        False,
        help="every site continues its optimiser's state (AdamW's moments, SGD's momentum) from round to round "
        "instead of starting it afresh (client.optimizer_state)",
    )
    freeze: str = setting(
        default_of(TrainConfig, "freeze"), choices=FREEZE_CHOICES, help="part of the model every site keeps fixed"
    )

    def __post_init__(self) -> None:
        if not self.pos_weight >= 0:
            raise PlanError(
                f"invalid training plan from the coordinator: pos_weight must be >= 0, got {self.pos_weight}"
            )

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {f"model.{f.name}": getattr(self.model, f.name) for f in fields(ModelOptions)}
        for key, array in self.normalizer.to_arrays().items():
            array = np.asarray(array, dtype=np.float64)
            record[f"norm.{key}"] = float(array) if array.ndim == 0 else array.tolist()
        for f in fields(self):
            if f.name not in ("model", "normalizer"):
                record[f.name] = getattr(self, f.name)
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> LocalPlan:
        try:
            model = ModelOptions(**{f.name: _typed(record, f"model.{f.name}", f.type) for f in fields(ModelOptions)})
            norm = {
                k.removeprefix("norm."): np.asarray(v, dtype=np.float64)
                for k, v in record.items()
                if k.startswith("norm.")
            }
            normalizer = Normalizer.from_arrays(norm)
            plan = {
                f.name: _typed(record, f.name, f.type) for f in fields(cls) if f.name not in ("model", "normalizer")
            }
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"invalid training plan from the coordinator: {e}") from e
        return cls(model=model, normalizer=normalizer, **plan)


def _typed(record: Mapping[str, Any], key: str, annotation: str) -> Any:
    if key not in record:
        raise KeyError(f"missing {key!r}")
    value = record[key]
    kind = {"int": int, "float": float, "str": str, "bool": bool}[annotation]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{key!r} must be {annotation}, got {type(value).__name__}")
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{key!r} must be finite, got {value}")
    return value
