"""A trained model as one file: weights, architecture, normaliser and variable names.

Everything needed to score new stays travels together, so a model trained centrally, by a
federation or in a simulation is used the same way. Saved with ``torch.save`` as tensors and
plain Python values only, so ``torch.load(weights_only=True)`` reads it without unpickling
arbitrary objects.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hymate.data.normalization import Normalizer
from hymate.files import atomic_write_bytes
from hymate.model import HyMaTE, HyMaTEConfig


@dataclass(frozen=True)
class ModelBundle:
    config: HyMaTEConfig
    state_dict: dict[str, torch.Tensor]
    normalizer: Normalizer
    variables: tuple[str, ...]
    static_names: tuple[str, ...]

    def build(self) -> HyMaTE:
        model = HyMaTE(self.config)
        model.load_state_dict(self.state_dict)
        return model.eval()

    def save(self, path: Path) -> None:
        payload = {
            "format": "hymate-model/1",
            "config": dataclasses.asdict(self.config),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict.items()},
            "normalizer": {
                k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in self.normalizer.to_arrays().items()
            },
            "variables": list(self.variables),
            "static_names": list(self.static_names),
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        atomic_write_bytes(Path(path), buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> ModelBundle:
        payload = torch.load(Path(path), weights_only=True)
        if payload.get("format") != "hymate-model/1":
            raise ValueError(f"{path} is not a HyMaTE model file")
        return cls(
            config=HyMaTEConfig(**payload["config"]),
            state_dict=payload["state_dict"],
            normalizer=Normalizer.from_arrays({k: v.numpy() for k, v in payload["normalizer"].items()}),
            variables=tuple(payload["variables"]),
            static_names=tuple(payload["static_names"]),
        )
