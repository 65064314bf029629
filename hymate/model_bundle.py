"""A trained model as one file: weights, architecture, normaliser and variable names.

Everything needed to score new stays travels together, so a model trained centrally, by a
federation or in a simulation is used the same way, and a pre-trained one (``hymate-pretrain``)
starts a new training (``--init-from``, ``initial_weights``). Saved with ``torch.save`` as
tensors and plain Python values only, so ``torch.load(weights_only=True)`` reads it without
unpickling arbitrary objects.
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
from hymate.model import HyMaTE, HyMaTEConfig, ModelOptions, StaySummaries, zero_head
from hymate.settings_fields import setting

# The architecture fields a checkpoint's weights fix (dropout and the scan kernel are free).
SHAPE_FIELDS: dict[str, str] = {
    "d_model": "--d-model",
    "n_mamba_layers": "--mamba-layers",
    "d_state": "--d-state",
    "n_attention_layers": "--attention-layers",
    "n_heads": "--heads",
}


@dataclass(frozen=True)
class Initialisation:
    """Where training starts; the one declaration of the ``--init-from`` flag (and run-config key)."""

    init_from: str = setting(
        "",
        help="start from this model file (hymate-pretrain's pretrained.pt, or a trained model) instead of random "
        "weights; "
        "the data must be in its vocabulary and the model of its shape",
    )


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


def initial_weights(
    path: str | Path, options: ModelOptions, variables: tuple[str, ...], static_names: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """The weights of checkpoint ``path`` for a model of ``options`` over this data's schema.

    ValueError, naming what differs and what to pass, when the checkpoint's vocabulary, static
    features or shape do not match (a shared-vocabulary checkpoint needs ``--vocabulary shared``
    data; the shape flags must repeat the checkpoint's). A checkpoint without the summary
    branch starts a model with it (``widen_for_summaries``); the reverse would drop trained
    weights and is refused.
    """
    try:
        bundle = ModelBundle.load(Path(path))
    except (OSError, RuntimeError, KeyError, TypeError) as e:
        raise ValueError(f"--init-from {path}: cannot read the model file ({e})") from e
    if bundle.variables != tuple(variables) or bundle.static_names != tuple(static_names):
        raise ValueError(
            f"--init-from {path}: the checkpoint reads {len(bundle.variables)} variables and "
            f"{len(bundle.static_names)} static features ({', '.join(bundle.variables[:4])}, ...), this data has "
            f"{len(variables)} and {len(static_names)} ({', '.join(variables[:4])}, ...): read the data in the "
            "checkpoint's vocabulary (--vocabulary shared for hymate-pretrain's)"
        )
    wanted = options.for_schema(len(variables), len(static_names))
    differs = [f for f in SHAPE_FIELDS if getattr(bundle.config, f) != getattr(wanted, f)]
    if differs or (bundle.config.d_conv, bundle.config.expand) != (wanted.d_conv, wanted.expand):
        shape = " ".join(f"{flag} {getattr(bundle.config, f)}" for f, flag in SHAPE_FIELDS.items())
        asked = ", ".join(f"{SHAPE_FIELDS[f]} {getattr(wanted, f)}" for f in differs)
        raise ValueError(f"--init-from {path}: the checkpoint's model is {shape}; this run asks for {asked}")
    if bundle.config.value_transform != wanted.value_transform:
        raise ValueError(
            f"--init-from {path}: the checkpoint's model reads values as --value-transform "
            f"{bundle.config.value_transform}; this run asks for {wanted.value_transform}: repeat the checkpoint's"
        )
    if bundle.config.summary_branch != wanted.summary_branch:
        if bundle.config.summary_branch:
            raise ValueError(
                f"--init-from {path}: the checkpoint's model reads the per-stay summaries (--summary-branch); "
                "this run does not: repeat --summary-branch"
            )
        widen_for_summaries(bundle.state_dict, StaySummaries.n_summaries * wanted.n_variables)
    if wanted.head_init == "zero":
        zero_head(bundle.state_dict)  # the bundle was loaded here for this call alone
    return bundle.state_dict


def widen_for_summaries(state: dict[str, torch.Tensor], n_summaries: int) -> None:
    """Give the static encoder of ``state`` (a model without the summary branch) zero-weight
    columns for ``n_summaries`` summary inputs, in place.

    Why zero: the widened model computes exactly what the checkpoint computed, so a pre-trained
    encoder (``hymate-pretrain`` has no summary branch: it forecasts from the sequence) starts
    the fine-tuning as it was, and the summaries enter as the gradient finds them useful.
    """
    inner = state["static.inner.weight"]
    state["static.inner.weight"] = torch.cat([inner, inner.new_zeros(inner.shape[0], n_summaries)], dim=1)
