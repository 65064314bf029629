"""The coordinator's run directory: one folder per completed round, written atomically.

```
run-dir/
  federation.json       schema, global normaliser, settings, the normaliser's sites: their
                        provenance and how their identities were established (before round 1)
  events.jsonl          every round, reply, rejection and refusal as it happened (server.events)
  round-001/            weights.npz, strategy.pkl, metrics.json (with the round's rejections and refusals)
  round-002/ ...
  model.pt              final model bundle (hymate.model_bundle)
  model_card.json/.md   config, provenance, rounds, per-site metrics, privacy spent
  metrics.csv           every round x phase x site x metric
```

A round folder is first written as ``.round-NNN.tmp`` and renamed into place, so a crash
leaves either a complete round or none; ``--resume`` continues after the last complete one.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hymate.files import write_json

log = logging.getLogger(__name__)

ROUND_DIR = re.compile(r"^round-(\d{3,})$")


class RunDirError(RuntimeError):
    """The run directory is in a state the requested action cannot use."""


@dataclass(frozen=True)
class RoundCheckpoint:
    round: int
    weights: dict[str, np.ndarray]
    strategy_state: dict[str, Any] | None
    metrics: dict[str, Any]


class RunDirectory:
    def __init__(self, path: Path):
        self.path = Path(path)

    def completed_rounds(self) -> list[int]:
        if not self.path.exists():
            return []
        return sorted(int(m.group(1)) for p in self.path.iterdir() if (m := ROUND_DIR.match(p.name)) and p.is_dir())

    def round_path(self, server_round: int) -> Path:
        return self.path / f"round-{server_round:03d}"

    def prepare(self, resume: bool) -> None:
        """Refuse to mix runs: a fresh run needs an empty run dir, a resumed one a started run."""
        rounds = self.completed_rounds()
        if not resume and (rounds or (self.path / "federation.json").exists()):
            raise RunDirError(
                f"{self.path} already holds a run ({len(rounds)} rounds); pass --resume to continue it or choose a new --run-dir"
            )
        if resume and not (self.path / "federation.json").exists():
            raise RunDirError(f"cannot resume: {self.path} holds no started run (no federation.json)")
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob(".round-*.tmp"):  # a round that was being written when we crashed
            shutil.rmtree(stale, ignore_errors=True)

    # -- the federation's fixed facts -------------------------------------------------

    def write_federation(self, facts: dict[str, Any]) -> None:
        write_json(self.path / "federation.json", facts)

    def read_federation(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "federation.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RunDirError(f"{self.path / 'federation.json'} is unreadable: {e}") from e

    # -- rounds ---------------------------------------------------------------------

    def write_round(self, checkpoint: RoundCheckpoint) -> None:
        final = self.round_path(checkpoint.round)
        tmp = self.path / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.savez(tmp / "weights.npz", **checkpoint.weights)
        if checkpoint.strategy_state is not None:
            (tmp / "strategy.pkl").write_bytes(pickle.dumps(checkpoint.strategy_state))
        write_json(tmp / "metrics.json", checkpoint.metrics)
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():  # only when a resumed run repeats a round that was already written
            shutil.rmtree(final)
        os.replace(tmp, final)

    def read_round(self, server_round: int) -> RoundCheckpoint:
        path = self.round_path(server_round)
        try:
            with np.load(path / "weights.npz") as npz:
                weights = {k: npz[k] for k in npz.files}
            state_file = path / "strategy.pkl"
            state = pickle.loads(state_file.read_bytes()) if state_file.exists() else None
            metrics = json.loads((path / "metrics.json").read_text())
        except (OSError, ValueError, pickle.UnpicklingError, EOFError) as e:
            raise RunDirError(f"checkpoint {path} is unreadable: {e}") from e
        return RoundCheckpoint(server_round, weights, state, metrics)

    def history(self) -> list[dict[str, Any]]:
        return [self.read_round(r).metrics for r in self.completed_rounds()]


def strategy_state(strategy: object) -> dict[str, Any] | None:
    """The strategy's attributes (server optimiser moments, momentum, clipping norm, ...), if picklable."""
    try:
        state = dict(vars(strategy))
        pickle.dumps(state)
        return state
    except Exception as e:  # a user strategy holding a lock, a socket, ...
        log.warning("strategy state of %s is not checkpointed (%s); resume restarts it", type(strategy).__name__, e)
        return None


def restore_strategy_state(strategy: object, state: dict[str, Any] | None) -> None:
    if state is not None:
        vars(strategy).update(state)
