"""HyMaTE against the baselines on named train/test sets: runs, their record, and the summary.

Shared by bench/p12.py and bench/p19.py. Every fitted model scores its test stays and the
run is written down at once (a row in ``results.csv`` and the per-stay scores in
``predictions/``), so a long bench that is stopped keeps every finished run, and
``summarise`` can be re-run over whatever is there (``--summarise``). The summary gives, per
protocol and model, mean +- sd over seeds (or splits) and the paired difference from gradient
boosting on the same test stays with a paired bootstrap 95 % interval
(``hymate.metrics.paired_bootstrap_difference``).

Peak RSS is the whole process's high-water mark during a model's fit and scoring (Linux
VmHWM after resetting it through ``/proc/self/clear_refs``), the data already loaded
included: what a user of the machine sees.
"""

from __future__ import annotations

import csv
import dataclasses
import re
import resource
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hymate.baseline import BASELINES, fit_baseline
from hymate.centralized import train_centralized
from hymate.data.batches import StayDataset, make_loader
from hymate.data.stays import StayTable
from hymate.metrics import auprc, auroc, paired_bootstrap_difference
from hymate.model import ModelOptions
from hymate.train import TrainConfig, evaluate, select_device

REFERENCE = BASELINES["gradient-boosting"].name
COLUMNS = ("protocol", "test", "model", "seed", "auroc", "auprc", "seconds", "peak_rss_mb", "n", "positives", "note")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """The process's peak resident memory (MB) within a ``with`` block."""

    def __enter__(self) -> PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
            self._linux = True
        except OSError:  # elsewhere: the lifetime peak
            self._linux = False
        self.mb = 0.0
        return self

    def __exit__(self, *_) -> None:
        kb = _status_kb("VmHWM") if self._linux else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.mb = kb / 1024


@dataclass(frozen=True)
class ModelRun:
    protocol: str
    test: str  # the test set's name (set-a, split-3, hospital_B, ...)
    model: str
    seed: int
    stay_ids: np.ndarray
    labels: np.ndarray
    probs: np.ndarray
    seconds: float
    peak_rss_mb: float
    note: str = ""

    def row(self) -> dict:
        return {
            "protocol": self.protocol,
            "test": self.test,
            "model": self.model,
            "seed": self.seed,
            "auroc": f"{auroc(self.labels, self.probs):.4f}",
            "auprc": f"{auprc(self.labels, self.probs):.4f}",
            "seconds": f"{self.seconds:.1f}",
            "peak_rss_mb": f"{self.peak_rss_mb:.0f}",
            "n": len(self.labels),
            "positives": int(self.labels.sum()),
            "note": self.note,
        }


class RunRecord:
    """``out/results.csv`` (one row per run, flushed at once) and ``out/predictions/*.npz``."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.predictions = self.out / "predictions"
        self.predictions.mkdir(parents=True, exist_ok=True)
        self.csv = self.out / "results.csv"

    def add(self, run: ModelRun) -> None:
        new = not self.csv.exists()
        with self.csv.open("a", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(run.row())
        name = re.sub(r"[^A-Za-z0-9.+_-]+", "_", f"{run.protocol}__{run.test}__{run.model}__seed{run.seed}") + ".npz"
        np.savez(
            self.predictions / name,
            stay_ids=run.stay_ids.astype(str),
            labels=run.labels,
            probs=run.probs,
            meta=np.array([run.protocol, run.test, run.model, str(run.seed), f"{run.seconds}", f"{run.peak_rss_mb}"]),
        )
        r = run.row()
        print(
            f"{r['protocol']:<12}{r['test']:<12}{r['model']:<36}{r['seed']:>5}{r['auroc']:>8}{r['auprc']:>8}"
            f"{r['seconds']:>9}{r['peak_rss_mb']:>8}  {r['note']}",
            flush=True,
        )

    def load(self) -> list[ModelRun]:
        runs = []
        for path in sorted(self.predictions.glob("*.npz")):
            with np.load(path) as z:
                protocol, test, model, seed, seconds, rss = (str(x) for x in z["meta"])
                runs.append(
                    ModelRun(
                        protocol,
                        test,
                        model,
                        int(seed),
                        z["stay_ids"],
                        z["labels"],
                        z["probs"],
                        float(seconds),
                        float(rss),
                    )
                )
        return runs


def header() -> None:
    print(
        f"{'protocol':<12}{'test':<12}{'model':<36}{'seed':>5}{'AUROC':>8}{'AUPRC':>8}{'wall s':>9}{'RSS MB':>8}",
        flush=True,
    )


def run_baselines(
    protocol: str, test_name: str, development: StayTable, test: StayTable, seed: int, record: RunRecord
) -> None:
    """Every baseline, tuned and fitted on all ``development`` stays, scored on ``test``."""
    for kind, spec in BASELINES.items():
        start = time.perf_counter()
        with PeakMemory() as memory:
            fitted = fit_baseline(kind, development, seed=seed)
            probs = fitted.predict(test)
        params = " ".join(f"{k.rsplit('__', 1)[-1]}={v}" for k, v in fitted.params.items())
        record.add(
            ModelRun(
                protocol, test_name, spec.name, seed, test.stay_ids, test.labels, probs,
                time.perf_counter() - start, memory.mb, f"cv {fitted.cv_score:.3f}; {params}",
            )
        )  # fmt: skip


def hymate_name(options: ModelOptions, config: TrainConfig) -> str:
    """The model's row name: the summary branch, the value transform and the fitting options that
    change what is trained on or kept, so that variants written to one OUT folder stay apart."""
    name = "HyMaTE+summaries" if options.summary_branch else "HyMaTE"
    if options.value_transform != "z":
        name += f"+{options.value_transform}"
    if config.validation_stays == "train":
        name += "+trainval"
    if config.ema_decay:
        name += f"+ema{config.ema_decay:g}"
    if config.pos_weight == 1.0:
        name += "+unweighted"
    if config.warmup_epochs:
        name += f"+warmup{config.warmup_epochs:g}"
    return name


def run_hymate(
    protocol: str,
    test_name: str,
    train: StayTable,
    val: StayTable,
    test: StayTable,
    options: ModelOptions,
    config: TrainConfig,
    record: RunRecord,
    init_from: str = "",
) -> None:
    """HyMaTE trained on ``train`` (from ``init_from`` when given) with early stopping on ``val``,
    scored on ``test`` in its row order."""
    start = time.perf_counter()
    with PeakMemory() as memory:
        result = train_centralized(train, val, {}, options, config, init_from)
        probs = predict_in_order(result, test, config)
    fitted = result.fit
    note = (
        f"best epoch {fitted.best_epoch} of {len(fitted.history)}; val AUROC {fitted.best.auroc:.3f}"
        if fitted.best is not None
        else f"{len(fitted.history)} epochs on the training and validation stays"
    )
    record.add(
        ModelRun(
            protocol, test_name, hymate_name(options, config), config.seed, test.stay_ids, test.labels, probs,
            time.perf_counter() - start, memory.mb, note,
        )
    )  # fmt: skip


def predict_in_order(result, table: StayTable, config: TrainConfig) -> np.ndarray:
    """Probabilities in ``table``'s row order (the loader batches by length, so ``evaluate``'s are not)."""
    loader = make_loader(StayDataset(table, result.normalizer, config.max_events), 2 * config.batch_size, False)
    order = np.concatenate([np.asarray(b, dtype=np.int64) for b in loader.batch_sampler])
    probs = np.empty(len(table))
    probs[order] = evaluate(result.model, loader, select_device(config.device)).probs
    return probs


def _rank(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)) / max(len(x) - 1, 1)


def _derived(runs: list[ModelRun]) -> list[ModelRun]:
    """Per test set and HyMaTE variant: the seed ensemble (mean probability), and the rank
    average of each HyMaTE seed with the gradient boosting of the same seed."""
    out = []
    by_test = defaultdict(list)
    for r in runs:
        by_test[(r.protocol, r.test)].append(r)
    for group in by_test.values():
        boosted = {r.seed: r for r in group if r.model == REFERENCE}
        for name in sorted({r.model for r in group if r.model.startswith("HyMaTE")}):
            seeds = [r for r in group if r.model == name]
            if len(seeds) > 1:
                first = seeds[0]
                probs = np.mean([r.probs for r in seeds], axis=0)
                out.append(dataclasses.replace(first, model=f"{name} seed ensemble", seed=-1, probs=probs,
                                               seconds=sum(r.seconds for r in seeds)))  # fmt: skip
            for r in seeds:
                if r.seed in boosted:
                    probs = (_rank(r.probs) + _rank(boosted[r.seed].probs)) / 2
                    out.append(dataclasses.replace(r, model=f"{name} + GBM rank average", probs=probs,
                                                   seconds=r.seconds + boosted[r.seed].seconds))  # fmt: skip
    return out


def summarise(record: RunRecord, n_resamples: int = 1000) -> str:
    """A markdown table: protocol x model, mean +- sd of AUROC/AUPRC over seeds (or splits), the paired
    difference from gradient boosting with its bootstrap 95 % interval, mean wall time, peak RSS."""
    runs = record.load()
    runs += _derived(runs)
    lines = [
        "| protocol | model | runs | AUROC mean ± sd | AUPRC mean ± sd | Δ AUROC vs GBM [95 % CI] | Δ AUPRC vs GBM [95 % CI] | wall s (mean) | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups = defaultdict(list)
    for r in runs:
        groups[(r.protocol, r.model)].append(r)
    order = sorted(groups, key=lambda k: (k[0], k[1] != REFERENCE, not k[1].startswith("Logistic"), k[1]))
    for protocol, model in order:
        group = groups[(protocol, model)]
        aurocs = [auroc(r.labels, r.probs) for r in group]
        auprcs = [auprc(r.labels, r.probs) for r in group]
        deltas = []
        for metric in ("auroc", "auprc"):
            deltas.append(
                _paired_text(
                    metric, group, [r for r in runs if r.protocol == protocol and r.model == REFERENCE], n_resamples
                )
            )
        rss = max(r.peak_rss_mb for r in group)
        lines.append(
            f"| {protocol} | {model} | {len(group)} | {_mean_sd(aurocs)} | {_mean_sd(auprcs)} | {deltas[0]} | {deltas[1]} "
            f"| {np.mean([r.seconds for r in group]):.0f} | {rss:.0f} |"
        )
    return "\n".join(lines)


def _mean_sd(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def _paired_text(metric: str, group: list[ModelRun], reference: list[ModelRun], n_resamples: int) -> str:
    """One interval per test set (its seeds paired on its stays); several test sets (random
    splits) get the mean of their differences and the range of their intervals' ends."""
    if not group or group[0].model == REFERENCE or not reference:
        return "—"
    intervals = []
    for test in sorted({r.test for r in group}):
        a = [r for r in group if r.test == test]
        b = [r for r in reference if r.test == test]
        if not b:
            continue
        if any(not np.array_equal(r.stay_ids, a[0].stay_ids) for r in a + b):
            raise ValueError(f"{test}: the runs did not score the same stays in the same order")
        intervals.append(
            paired_bootstrap_difference(metric, a[0].labels, [r.probs for r in a], [r.probs for r in b], n_resamples)
        )
    if not intervals:
        return "—"
    if len(intervals) == 1:
        i = intervals[0]
        return f"{i.value:+.3f} [{i.low:+.3f}, {i.high:+.3f}]"
    mean = np.mean([i.value for i in intervals])
    above = sum(i.low > 0 for i in intervals)
    below = sum(i.high < 0 for i in intervals)
    return f"{mean:+.3f} (per split {min(i.value for i in intervals):+.3f}..{max(i.value for i in intervals):+.3f}; CI above 0 in {above}, below in {below} of {len(intervals)})"
