"""Virtual sites of a simulation: each one a partition of a public dataset.

The simulator writes a ``SimulationManifest`` (which dataset, which stays each virtual
hospital holds) and passes its path in the run config; under Flower's Simulation Engine
every virtual node gets a ``partition-id`` and the ClientApp opens that partition here. The
ClientApp's handlers are the same as a real hospital's: only where the data comes from
differs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from client.site import DPSettings, LocalData, SiteSettings
from hymate.data import LoadSummary, load_dataset, split_stays
from hymate.data.stays import DataError, StayTable
from hymate.files import atomic_write_text


@dataclass(frozen=True)
class Partition:
    name: str
    stay_ids: list[str]


@dataclass(frozen=True)
class SimulationManifest:
    dataset: str
    data: str | None
    state_root: str
    partitions: list[Partition]
    split_seed: int = 0
    dataset_options: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)  # DPSettings fields every virtual site gets (none: no DP)

    def save(self, path: Path) -> None:
        atomic_write_text(Path(path), json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: str | Path) -> SimulationManifest:
        try:
            raw = json.loads(Path(path).read_text())
            raw["partitions"] = [Partition(**p) for p in raw["partitions"]]
            return cls(**raw)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise DataError(f"simulation manifest {path} is unreadable: {e}") from e


@cache
def _dataset(manifest_path: str) -> tuple[SimulationManifest, StayTable, dict[str, int]]:
    """The whole dataset, loaded once per worker process and shared by its virtual sites."""
    manifest = SimulationManifest.load(manifest_path)
    table = load_dataset(manifest.dataset, manifest.data, **manifest.dataset_options)
    return manifest, table, {str(s): i for i, s in enumerate(table.stay_ids)}


@cache
def open_partition(manifest_path: str, partition_id: int) -> LocalData:
    manifest, table, row_of = _dataset(manifest_path)
    if not 0 <= partition_id < len(manifest.partitions):
        raise DataError(f"partition {partition_id} is not in {manifest_path} ({len(manifest.partitions)} partitions)")
    partition = manifest.partitions[partition_id]
    sub = table.subset(np.array([row_of[s] for s in partition.stay_ids], dtype=np.int64))
    settings = SiteSettings(
        dataset=manifest.dataset,
        state_dir=Path(manifest.state_root) / partition.name,
        data=Path(manifest.data) if manifest.data else None,
        name=partition.name,
        split_seed=manifest.split_seed,
        dp=DPSettings(**manifest.privacy) if manifest.privacy else None,
    )
    train, val, test = split_stays(sub, seed=manifest.split_seed).tables(sub)
    return LocalData(settings, train, val, test, LoadSummary(source=manifest.dataset, stays=len(sub)))
