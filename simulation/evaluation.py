"""Scoring a trained model on sites' test stays: tidy metric rows with bootstrap intervals."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hymate.data.batches import StayDataset, make_loader
from hymate.data.normalization import Normalizer
from hymate.data.stays import StayTable
from hymate.metrics import METRICS, bootstrap_interval
from hymate.model import HyMaTE
from hymate.train import evaluate, select_device


@dataclass(frozen=True)
class Predictions:
    labels: np.ndarray
    probs: np.ndarray


def predict(
    model: HyMaTE, normalizer: Normalizer, table: StayTable, max_events: int, device: str = "auto"
) -> Predictions:
    target = select_device(device)
    loader = make_loader(StayDataset(table, normalizer, max_events), 64, shuffle=False)
    result = evaluate(model.to(target), loader, target)
    return Predictions(result.labels, result.probs)


def metric_rows(predictions: Predictions, n_resamples: int = 200, bootstrap_seed: int = 0, **keys) -> list[dict]:
    """One row per metric (AUROC, AUPRC, Brier, ECE) with its 95 % bootstrap interval."""
    rows = []
    for metric in METRICS:
        interval = bootstrap_interval(
            metric, predictions.labels, predictions.probs, n_resamples=n_resamples, seed=bootstrap_seed
        )
        rows.append(
            keys
            | {
                "metric": metric,
                "value": interval.value,
                "ci_low": interval.low,
                "ci_high": interval.high,
                "n": len(predictions.labels),
                "positives": int(predictions.labels.sum()),
            }
        )
    return rows


@torch.no_grad()
def variable_importance(model: HyMaTE, normalizer: Normalizer, table: StayTable, max_events: int) -> np.ndarray:
    """Mean per-stay importance of each variable (attention and pooling), (n_variables,)."""
    model.eval().cpu()
    loader = make_loader(StayDataset(table, normalizer, max_events), 64, shuffle=False)
    total = torch.zeros(model.config.n_variables + 1)
    for batch in loader:
        total += model.variable_importance(batch).sum(0)
    return (total[1:] / max(len(table), 1)).numpy()
