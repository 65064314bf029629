"""Centralized HyMaTE vs. gradient boosting on real PhysioNet/CinC 2012 mortality.

The HyMaTE lineage's split: train/validate on sets b+c (80/20, stratified, patient-level),
test on set-a. Both models see the same stays; the baseline is scikit-learn's
HistGradientBoostingClassifier on per-variable summaries (hymate.baseline).

    python bench/p12.py [--data DIR] [--epochs N] [--seeds 0 1 2]
    python bench/p12.py --vocabulary shared --init-from runs/pretrain/p19/pretrained.pt [--freeze embeddings]

DIR defaults to .cache/data/physionet2012, unpacked from ../shared/data/physionet2012.tar.gz
when that archive is there.
"""

from __future__ import annotations

import argparse
import logging
import tarfile
import time
from dataclasses import replace
from pathlib import Path

from hymate.baseline import fit_gradient_boosting, predict_gradient_boosting
from hymate.centralized import train_centralized
from hymate.data import VocabularyChoice, load_dataset, split_stays
from hymate.metrics import auprc, auroc
from hymate.model import ModelOptions
from hymate.model_bundle import Initialisation
from hymate.settings_fields import add_flags
from hymate.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT.parent / "shared" / "data" / "physionet2012.tar.gz"


def ensure_data(data: Path | None) -> Path:
    if data is not None:
        return data
    target = ROOT / ".cache" / "data" / "physionet2012"
    if not target.exists():
        if not ARCHIVE.exists():
            raise SystemExit(f"no PhysioNet 2012 data: pass --data DIR or provide {ARCHIVE}")
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(target.parent, filter="data")
    return target


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path)
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--d-model", type=int, default=ModelOptions.d_model)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.learning_rate)
    p.add_argument("--dropout", type=float, default=ModelOptions.dropout)
    p.add_argument("--max-events", type=int, default=TrainConfig.max_events)
    add_flags(p, VocabularyChoice)
    add_flags(p, Initialisation)
    add_flags(p, TrainConfig, ("freeze",))
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s")

    root = ensure_data(args.data)
    t0 = time.perf_counter()
    development = load_dataset("physionet2012", root, sets=("b", "c"), vocabulary=args.vocabulary)
    test = load_dataset("physionet2012", root, sets=("a",), vocabulary=args.vocabulary)
    print(f"loaded {len(development)} development and {len(test)} test stays in {time.perf_counter() - t0:.1f} s")

    print(f"{'model':<34}{'seed':>5}{'AUROC':>8}{'AUPRC':>8}{'wall s':>9}")
    for seed in args.seeds:
        split = split_stays(development, fractions=(0.8, 0.2, 0.0), seed=seed)
        train, val = development.subset(split.train), development.subset(split.val)

        t0 = time.perf_counter()
        booster = fit_gradient_boosting(train, seed=seed)
        probs = predict_gradient_boosting(booster, test)
        gb_time = time.perf_counter() - t0
        print(
            f"{'HistGradientBoosting (summaries)':<34}{seed:>5}{auroc(test.labels, probs):>8.4f}{auprc(test.labels, probs):>8.4f}{gb_time:>9.1f}"
        )

        model = ModelOptions(d_model=args.d_model, dropout=args.dropout)
        config = replace(
            TrainConfig(),
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            max_events=args.max_events,
            seed=seed,
            freeze=args.freeze,
        )
        result = train_centralized(train, val, {"set-a": test}, model, config, args.init_from)
        ev = result.test["set-a"]
        start = f", from {Path(args.init_from).parent.name}, freeze {args.freeze}" if args.init_from else ""
        print(
            f"{'HyMaTE (best epoch ' + str(result.fit.best_epoch) + start + ')':<34}{seed:>5}{ev.auroc:>8.4f}{ev.auprc:>8.4f}{result.seconds:>9.1f}"
        )


if __name__ == "__main__":
    main()
