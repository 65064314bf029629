"""``hymate-sim``: run an experiment on one machine and write its output folder."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hymate.data import DataError
from hymate.model import ModelOptions
from hymate.train import TrainConfig
from simulation.protocols import ExperimentSpec, run_experiment

PROTOCOLS = ("centralized",)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hymate-sim",
        description="Simulate HyMaTE training on one machine and report per-site AUROC/AUPRC.",
    )
    p.add_argument("--protocol", choices=PROTOCOLS, default="centralized")
    p.add_argument("--dataset", default="synthetic", help="synthetic (default, generated) or physionet2012")
    p.add_argument("--data", type=Path, help="folder with the dataset's raw files (not needed for synthetic)")
    p.add_argument("--out", type=Path, default=Path("runs/latest"), help="output folder")
    p.add_argument("--seed", type=int, default=0)
    model = p.add_argument_group("model")
    model.add_argument("--d-model", type=int, default=ModelOptions.d_model)
    model.add_argument("--mamba-layers", type=int, default=ModelOptions.n_mamba_layers)
    model.add_argument("--attention-layers", type=int, default=ModelOptions.n_attention_layers)
    model.add_argument("--dropout", type=float, default=ModelOptions.dropout)
    model.add_argument("--scan-backend", choices=("auto", "cpu", "torch", "cuda"), default="auto")
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    train.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    train.add_argument("--lr", type=float, default=TrainConfig.learning_rate)
    train.add_argument("--patience", type=int, default=TrainConfig.patience)
    train.add_argument("--max-events", type=int, default=TrainConfig.max_events)
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    return p


def spec_from_args(args: argparse.Namespace) -> ExperimentSpec:
    return ExperimentSpec(
        protocol=args.protocol,
        dataset=args.dataset,
        data=args.data,
        out=args.out,
        seed=args.seed,
        model=ModelOptions(
            d_model=args.d_model,
            n_mamba_layers=args.mamba_layers,
            n_attention_layers=args.attention_layers,
            dropout=args.dropout,
            scan_backend=args.scan_backend,
        ),
        train=TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            patience=args.patience,
            max_events=args.max_events,
            device=args.device,
            seed=args.seed,
        ),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        spec = spec_from_args(args)
        summary = run_experiment(spec)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"hymate-sim: error: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
