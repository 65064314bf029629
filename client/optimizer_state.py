"""A site's optimiser state, kept at the site from one round to the next.

A fresh AdamW every round restarts its moment estimates, and its bias correction then makes
the first steps about sign(gradient) x learning rate in every coordinate, whatever that
coordinate's signal. At a site of a few hundred stays a round is only a handful of steps, so
most of a federation's steps are such restarts; centralized training's one optimiser has them
once. With ``keep-optimizer-state`` a site keeps its optimiser's per-parameter state (AdamW's
moments and step count, SGD's momentum buffer) in its state dir and continues it from the next
global model. The hyper-parameters (learning rate, weight decay) stay the plan's. The state is
computed from the site's own gradients and never leaves the site; under DP it is
post-processing of noised gradients, so it spends no budget.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from hymate.files import atomic_write_bytes

FILE_NAME = "optimizer-state.pt"


def load_optimizer_state(optimizer: torch.optim.Optimizer, kind: str, state_dir: Path) -> bool:
    """Continue ``optimizer`` (a ``kind`` optimiser) from the site's saved state; False before
    its first round. A state saved by another optimiser or for other parameters is refused."""
    path = Path(state_dir) / FILE_NAME
    if not path.exists():
        return False
    saved = torch.load(path, weights_only=True)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    problem = _mismatch(saved, kind, params)
    if problem:
        raise ValueError(f"{path} {problem}; remove it to start the optimiser afresh")
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": saved["state"], "param_groups": current["param_groups"]})
    return True


def save_optimizer_state(optimizer: torch.optim.Optimizer, kind: str, state_dir: Path) -> None:
    buffer = io.BytesIO()
    torch.save({"optimizer": kind, "state": optimizer.state_dict()["state"]}, buffer)
    atomic_write_bytes(Path(state_dir) / FILE_NAME, buffer.getvalue())


def _mismatch(saved: dict, kind: str, params: list[torch.Tensor]) -> str:
    if saved.get("optimizer") != kind:
        return f"holds the state of optimiser {saved.get('optimizer')!r}, not {kind!r}"
    for index, entry in saved["state"].items():
        if not 0 <= index < len(params):
            return f"holds state for parameter {index} of a model with {len(params)}"
        for name, value in entry.items():
            if value.ndim > 0 and value.shape != params[index].shape:
                return (
                    f"holds {name} of shape {tuple(value.shape)} for a parameter of shape {tuple(params[index].shape)}"
                )
    return ""
