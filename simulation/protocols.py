"""Experiment protocols and what they write: one spec in, one output folder out."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from hymate.centralized import train_centralized
from hymate.data import load_dataset, split_stays
from hymate.files import write_csv, write_json
from hymate.model import ModelOptions
from hymate.train import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExperimentSpec:
    protocol: str
    dataset: str
    data: Path | None
    out: Path
    seed: int = 0
    model: ModelOptions = field(default_factory=ModelOptions)
    train: TrainConfig = field(default_factory=TrainConfig)


def run_experiment(spec: ExperimentSpec) -> str:
    """Run the spec's protocol, write its output folder, return a short summary for the terminal."""
    if spec.protocol != "centralized":
        raise ValueError(f"unknown protocol {spec.protocol!r}")
    table = load_dataset(spec.dataset, spec.data)
    split = split_stays(table, seed=spec.seed)
    train, val, test = table.subset(split.train), table.subset(split.val), table.subset(split.test)
    tests = {"all": test} | {site: test.where_site(site) for site in test.site_names()}
    result = train_centralized(train, val, tests, spec.model, spec.train)

    spec.out.mkdir(parents=True, exist_ok=True)
    rows = [
        {"protocol": spec.protocol, "train_sites": "all", "test_site": name, "metric": metric, "value": getattr(ev, metric), "n": ev.n, "seed": spec.seed}
        for name, ev in result.test.items()
        for metric in ("auroc", "auprc")
    ]
    write_csv(spec.out / "results.csv", pd.DataFrame(rows))
    write_csv(spec.out / "history.csv", pd.DataFrame(result.fit.history))
    overall = result.test["all"]
    write_json(
        spec.out / "metrics.json",
        {"test_auroc": overall.auroc, "test_auprc": overall.auprc, "n_test": overall.n, "best_epoch": result.fit.best_epoch, "seconds": result.seconds},
    )
    write_json(spec.out / "config.json", {"spec": spec, "model_config": result.model.config})
    torch.save({"state_dict": result.model.state_dict(), "config": result.model.config}, spec.out / "model.pt")
    return (
        f"{spec.protocol} on {spec.dataset}: test AUROC {overall.auroc:.4f}, AUPRC {overall.auprc:.4f} "
        f"(n={overall.n}, best epoch {result.fit.best_epoch}, {result.seconds:.0f} s) -> {spec.out}"
    )
