"""The coordinator's run directory: its layout, one folder per completed round written atomically,
and typed readers of the finished run. The only module that knows a path or file name in it.

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
  superlink/            the SuperLink's state and the run config it was given (server.superlink)
  manifest.json, sites/ a simulation's virtual sites: their partitions, and each one's state
```

A round folder is first written as ``.round-NNN.tmp`` and renamed into place, so a crash
leaves either a complete round or none; ``--resume`` continues after the last complete one.
Writers (``server.federation``, ``server.model_card``, ``simulation.engine``) and readers
(``simulation.report``, ``hymate-server``) ask this module for paths and contents, so the
layout can change here alone; what the card's JSON holds is ``server.model_card``'s.
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
import pandas as pd

from hymate.files import atomic_write_text, write_csv, write_json
from hymate.model_bundle import ModelBundle
from server.federation_facts import FederationFacts
from server.model_card import ModelCardSummary, evaluation_curves
from server.settings import ServerSettings

log = logging.getLogger(__name__)

FEDERATION_FILE = "federation.json"
EVENTS_FILE = "events.jsonl"
MODEL_FILE = "model.pt"
MODEL_CARD_FILE = "model_card.json"
MODEL_CARD_MARKDOWN_FILE = "model_card.md"
METRICS_TABLE_FILE = "metrics.csv"
SUPERLINK_DIR = "superlink"
SUPERLINK_RUN_CONFIG_FILE = "run_config.toml"
SIMULATION_MANIFEST_FILE = "manifest.json"
SITE_STATE_DIR = "sites"
# Inside a round folder.
ROUND_WEIGHTS_FILE = "weights.npz"
ROUND_STRATEGY_FILE = "strategy.pkl"
ROUND_METRICS_FILE = "metrics.json"

ROUND_PREFIX = "round-"
ROUND_DIR = re.compile(rf"^{ROUND_PREFIX}(\d{{3,}})$")


def round_dir_name(server_round: int) -> str:
    return f"{ROUND_PREFIX}{server_round:03d}"


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

    # -- where things are -----------------------------------------------------------

    @property
    def federation_file(self) -> Path:
        return self.path / FEDERATION_FILE

    @property
    def events_file(self) -> Path:
        return self.path / EVENTS_FILE

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def model_card_file(self) -> Path:
        return self.path / MODEL_CARD_FILE

    @property
    def model_card_markdown_file(self) -> Path:
        return self.path / MODEL_CARD_MARKDOWN_FILE

    @property
    def metrics_table_file(self) -> Path:
        return self.path / METRICS_TABLE_FILE

    @property
    def superlink_dir(self) -> Path:
        return self.path / SUPERLINK_DIR

    @property
    def superlink_run_config_file(self) -> Path:
        return self.superlink_dir / SUPERLINK_RUN_CONFIG_FILE

    @property
    def simulation_manifest_file(self) -> Path:
        return self.path / SIMULATION_MANIFEST_FILE

    @property
    def site_state_root(self) -> Path:
        return self.path / SITE_STATE_DIR

    def round_path(self, server_round: int) -> Path:
        return self.path / round_dir_name(server_round)

    # -- a run's life ---------------------------------------------------------------

    def completed_rounds(self) -> list[int]:
        if not self.path.exists():
            return []
        return sorted(int(m.group(1)) for p in self.path.iterdir() if (m := ROUND_DIR.match(p.name)) and p.is_dir())

    def is_finished(self) -> bool:
        """The final outputs are written (the model card is the last of them to appear)."""
        return self.model_card_file.exists()

    def prepare(self, resume: bool) -> None:
        """Refuse to mix runs: a fresh run needs an empty run dir, a resumed one a started run."""
        rounds = self.completed_rounds()
        if not resume and (rounds or self.federation_file.exists()):
            raise RunDirError(
                f"{self.path} already holds a run ({len(rounds)} rounds); pass --resume to continue it or choose a new --run-dir"
            )
        if resume and not self.federation_file.exists():
            raise RunDirError(f"cannot resume: {self.path} holds no started run (no {FEDERATION_FILE})")
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob(f".{ROUND_PREFIX}*.tmp"):  # a round that was being written when we crashed
            shutil.rmtree(stale, ignore_errors=True)

    # -- the federation's fixed facts -------------------------------------------------

    def write_federation(self, facts: FederationFacts, settings: ServerSettings) -> None:
        write_json(self.federation_file, {"facts": facts, "settings": settings})

    def read_facts(self) -> FederationFacts:
        """The facts a resumed run continues with (the settings beside them are for people to read)."""
        try:
            return FederationFacts(**json.loads(self.federation_file.read_text())["facts"])
        except (OSError, json.JSONDecodeError) as e:
            raise RunDirError(f"{self.federation_file} is unreadable: {e}") from e
        except (KeyError, TypeError) as e:
            raise RunDirError(f"{self.federation_file} holds no valid 'facts': {e}") from e

    # -- rounds ---------------------------------------------------------------------

    def write_round(self, checkpoint: RoundCheckpoint) -> None:
        final = self.round_path(checkpoint.round)
        tmp = self.path / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.savez(tmp / ROUND_WEIGHTS_FILE, **checkpoint.weights)
        if checkpoint.strategy_state is not None:
            (tmp / ROUND_STRATEGY_FILE).write_bytes(pickle.dumps(checkpoint.strategy_state))
        write_json(tmp / ROUND_METRICS_FILE, checkpoint.metrics)
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():  # only when a resumed run repeats a round that was already written
            shutil.rmtree(final)
        os.replace(tmp, final)

    def read_round(self, server_round: int) -> RoundCheckpoint:
        path = self.round_path(server_round)
        try:
            with np.load(path / ROUND_WEIGHTS_FILE) as npz:
                weights = {k: npz[k] for k in npz.files}
            state_file = path / ROUND_STRATEGY_FILE
            state = pickle.loads(state_file.read_bytes()) if state_file.exists() else None
        except (OSError, ValueError, pickle.UnpicklingError, EOFError) as e:
            raise RunDirError(f"checkpoint {path} is unreadable: {e}") from e
        return RoundCheckpoint(server_round, weights, state, self.round_metrics(server_round))

    def round_metrics(self, server_round: int) -> dict[str, Any]:
        """One completed round's metrics, without reading its weights."""
        path = self.round_path(server_round)
        try:
            return json.loads((path / ROUND_METRICS_FILE).read_text())
        except (OSError, ValueError) as e:
            raise RunDirError(f"checkpoint {path} is unreadable: {e}") from e

    def history(self) -> list[dict[str, Any]]:
        """Every completed round's metrics, in order."""
        return [self.round_metrics(server_round) for server_round in self.completed_rounds()]

    # -- final outputs --------------------------------------------------------------

    def save_model(self, bundle: ModelBundle) -> Path:
        bundle.save(self.model_file)
        return self.model_file

    def load_model(self) -> ModelBundle:
        return ModelBundle.load(self.model_file)

    def write_model_card(self, card: dict[str, Any], markdown: str, metrics_table: pd.DataFrame) -> None:
        """The metrics table and the markdown first: the JSON card's arrival marks the run finished."""
        write_csv(self.metrics_table_file, metrics_table)
        atomic_write_text(self.model_card_markdown_file, markdown)
        write_json(self.model_card_file, card)

    def model_card(self) -> ModelCardSummary:
        """What a finished run's card says about privacy spent and the final evaluation."""
        try:
            return ModelCardSummary.from_card(json.loads(self.model_card_file.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise RunDirError(f"{self.model_card_file} is unreadable: {e}") from e

    def evaluation_curves(self) -> pd.DataFrame:
        """Per round, site (and the weighted mean) and metric, the evaluation value: round, site, metric, value."""
        try:
            return evaluation_curves(pd.read_csv(self.metrics_table_file))
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise RunDirError(f"{self.metrics_table_file} is unreadable: {e}") from e


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
