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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hymate.metrics import paired_bootstrap_difference
from server.run_dir import RunDirectory
from simulation.cli import spec_from_args
from simulation.evaluation import Predictions
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


@dataclass(frozen=True)
class ProtocolRun:
    """One protocol's scores, wall seconds and predictions on the pooled test stays."""

    scores: dict[str, float | str]
    seconds: float
    pooled: Predictions


def run_protocol(spec: SimulationSpec, protocol: str) -> ProtocolRun:
    """``protocol`` (its first seed) under ``spec``. The parsed-data cache makes loading again
    cheap, and the partition and splits are fixed by the split seed, so every variant sees the
    same stays, in the same order: their pooled predictions pair (``paired_scores``)."""
    start = time.perf_counter()
    seed = spec.seeds[0]
    experiment = Experiment(dataclasses.replace(spec, protocols=(protocol,), seeds=(seed,)))
    result = experiment.run()
    out = scores(result.rows, protocol)
    for path in result.federated_runs.values():  # one run: the federated protocol's first seed
        out["kept round"] = RunDirectory(path).model_card().kept_round
    return ProtocolRun(out, time.perf_counter() - start, result.pooled_predictions[protocol, seed])


def paired_scores(
    runs: Sequence[Predictions], references: Sequence[Predictions], label: str, n_resamples: int = 1000
) -> dict[str, str]:
    """AUROC and AUPRC of ``runs`` minus those of ``references`` (each a model's pooled test
    predictions; several: seeds, averaged on each side) with paired bootstrap 95 % intervals,
    as table cells headed ``"d AUROC vs <label>"``."""
    labels = references[0].labels
    for p in (*runs, *references):
        if not np.array_equal(p.labels, labels):
            raise ValueError("paired_scores: the runs were not scored on the same test stays in the same order")
    cells = {}
    for metric in ("auroc", "auprc"):
        d = paired_bootstrap_difference(
            metric, labels, [p.probs for p in runs], [p.probs for p in references], n_resamples=n_resamples
        )
        cells[f"d {metric.upper()} vs {label}"] = f"{d.value:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
    return cells


def plan_text(spec: SimulationSpec) -> str:
    """Rounds x local epochs (and the optimiser and batch) of a federated spec, for a table column."""
    train = spec.train
    return (
        f"{spec.rounds} x {spec.local_epochs}, {train.optimizer} lr {train.learning_rate:g}, batch {train.batch_size}"
        + (", state kept" if spec.keep_optimizer_state else "")
    )
