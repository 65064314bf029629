"""Several hymate-sim configurations compared on one loaded experiment: the benches' shared part.

A variant is a string of extra hymate-sim flags (``"--strategy fedadam --strategy-option
eta=0.01 --local-epochs 2"``) parsed on top of the bench's own flags, so the benches speak the
simulator's vocabulary. The data are loaded, partitioned and split once; every variant trains
on the same sites and is scored on the same test stays (a variant may change training, model,
strategy and privacy flags, never the data or the split).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import time
from pathlib import Path

from server.run_dir import RunDirectory
from simulation.cli import spec_from_args
from simulation.protocols import Experiment, SimulationSpec
from simulation.report import results_frame

# What a variant must not change: every variant is scored on the experiment's test stays.
DATA_FIELDS = ("dataset", "data", "dataset_options", "partition", "sites", "min_site_size", "split_seed")


def variant_spec(parser: argparse.ArgumentParser, argv: list[str], variant: str, out: Path) -> SimulationSpec:
    """The spec of the bench's flags ``argv`` followed by the variant's flags, writing to ``out``;
    a variant that changes the data or the split is refused (its scores would not be comparable)."""
    base = spec_from_args(parser.parse_args([*argv, "--out", str(out)]))
    spec = spec_from_args(parser.parse_args([*argv, *shlex.split(variant), "--out", str(out)]))
    changed = [f for f in DATA_FIELDS if getattr(base, f) != getattr(spec, f)]
    if changed:
        raise ValueError(f"variant {variant!r} changes the data or the split ({', '.join(changed)}): not comparable")
    return spec


def scores(rows: list[dict], protocol: str) -> dict[str, float | str]:
    """Pooled AUROC/AUPRC with their 95 % intervals, and the mean over the sites, of one protocol."""
    frame = results_frame(rows)
    frame = frame[(frame["protocol"] == protocol) & frame["metric"].isin(["auroc", "auprc"])]
    pooled = frame[frame["test_site"] == "pooled"].set_index("metric")
    sites = frame[frame["test_site"] != "pooled"].groupby("metric")["value"].mean()
    out: dict[str, float | str] = {}
    for metric in ("auroc", "auprc"):
        row = pooled.loc[metric]
        out[f"pooled {metric.upper()}"] = float(row["value"])
        out[f"{metric.upper()} 95% CI"] = f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
        out[f"site-mean {metric.upper()}"] = float(sites[metric])
    return out


def run_protocol(spec: SimulationSpec, protocol: str) -> tuple[dict, float]:
    """``protocol`` (its first seed) under ``spec``; returns its scores and wall seconds. The
    parsed-data cache makes loading again cheap, and the partition and splits are fixed by the
    split seed, so every variant sees the same stays."""
    start = time.perf_counter()
    experiment = Experiment(dataclasses.replace(spec, protocols=(protocol,), seeds=spec.seeds[:1]))
    result = experiment.run()
    out = scores(result.rows, protocol)
    for path in result.federated_runs.values():  # one run: the federated protocol's first seed
        out["kept round"] = RunDirectory(path).model_card().kept_round
    return out, time.perf_counter() - start


def plan_text(spec: SimulationSpec) -> str:
    """Rounds x local epochs (and the optimiser and batch) of a federated spec, for a table column."""
    train = spec.train
    return (
        f"{spec.rounds} x {spec.local_epochs}, {train.optimizer} lr {train.learning_rate:g}, batch {train.batch_size}"
        + (", state kept" if spec.keep_optimizer_state else "")
    )
