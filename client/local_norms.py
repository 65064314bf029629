"""FedBN: a site's normalisation layers stay at the site.

Sites differ in how their measurements are scaled and distributed (devices, units, case
mix); FedBN (Li et al., ICLR 2021) lets each site keep its own normalisation parameters while
everything else is federated. HyMaTE normalises with LayerNorm, so those are the layers kept.
The site's copies live in its state dir, on its own disk: they survive a SuperNode restart and
are what the site's personalised model is made of. The coordinator still receives and averages
them (that average is the global model's starting point for a new site); every site replaces
them with its own before training or evaluating.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from hymate.files import atomic_write_bytes
from hymate.model import HyMaTE, normalisation_parameters

FILE_NAME = "local-norms.npz"


def load_local_norms(model: HyMaTE, state_dir: Path) -> bool:
    """Put the site's own normalisation parameters into ``model``; False before its first round."""
    path = Path(state_dir) / FILE_NAME
    if not path.exists():
        return False
    names = normalisation_parameters(model)
    with np.load(path) as saved:
        if sorted(saved.files) != sorted(names):
            raise ValueError(f"{path} holds normalisation parameters of a different model; remove it to start afresh")
        state = {name: torch.from_numpy(saved[name].copy()) for name in names}
    model.load_state_dict(state, strict=False)
    return True


def save_local_norms(model: HyMaTE, state_dir: Path) -> None:
    state = model.state_dict()
    buffer = io.BytesIO()
    np.savez(buffer, **{name: state[name].detach().cpu().numpy() for name in normalisation_parameters(model)})
    atomic_write_bytes(Path(state_dir) / FILE_NAME, buffer.getvalue())
