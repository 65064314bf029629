"""``hymate-pretrain``: a pre-trained HyMaTE checkpoint from public stays, for ``--init-from``.

    hymate-pretrain --data .cache/data/physionet2019 --out runs/pretrain/p19 --d-model 32
    hymate-server ... --init-from runs/pretrain/p19/pretrained.pt      (sites: --vocabulary shared)
    hymate-sim --dataset physionet2012 --vocabulary shared --init-from runs/pretrain/p19/pretrained.pt

Forecasts the next hours of every variable from the stays' history (``hymate.pretraining``) on
a public data set, by default PhysioNet 2019 in the shared clinical vocabulary, and writes
``OUT/pretrained.pt`` (weights, architecture, normaliser, vocabulary) and ``OUT/pretraining.json``
(settings, data, the loss of every epoch, wall time). Labels are never read. The data are
public, so no site spends privacy budget on them: a federation's DP guarantee covers what it
trains on private stays after ``--init-from``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from hymate.cli_options import parse_with_config_file
from hymate.data import DEFAULT_CACHE_DIR, DataError, LoadSummary, VocabularyChoice, load_dataset
from hymate.files import atomic_write_text
from hymate.model import ModelOptions
from hymate.pretraining import PretrainConfig, pretrain
from hymate.settings_fields import add_flags, flag_values

log = logging.getLogger("hymate-pretrain")

# The checkpoint is a ModelBundle file, named apart from a federation's final model.
CHECKPOINT = "pretrained.pt"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hymate-pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", type=Path, help="TOML file with any of these options (flags win)")
    data = p.add_argument_group("public data")
    data.add_argument("--dataset", default="physionet2019", help="physionet2019 (default), physionet2012, ...")
    data.add_argument("--data", type=Path, help="folder with the dataset's raw files (default .cache/data/<dataset>)")
    data.add_argument("--sets", help="sets to load, comma-separated: A,B (physionet2019) or a,b,c (physionet2012)")
    data.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="parsed-data cache")
    add_flags(data, VocabularyChoice, defaults={"vocabulary": "shared"})
    add_flags(p.add_argument_group("model"), ModelOptions, defaults={"d_model": 32})
    add_flags(p.add_argument_group("pre-training"), PretrainConfig)
    p.add_argument("--out", type=Path, required=True, help="folder for pretrained.pt and pretraining.json (new)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_with_config_file(build_parser(), argv)
        if (args.out / CHECKPOINT).exists():
            raise ValueError(
                f"--out {args.out} already holds a pre-trained checkpoint; choose another folder (nothing was changed)"
            )
        config = PretrainConfig(**flag_values(PretrainConfig, args))
        options = ModelOptions(**flag_values(ModelOptions, args))
    except ValueError as e:
        print(f"hymate-pretrain: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("hymate.data").setLevel(logging.WARNING)
    summary = LoadSummary(source=args.dataset)
    sets = {"sets": [s.strip() for s in args.sets.split(",") if s.strip()]} if args.sets else {}
    try:
        table = load_dataset(
            args.dataset, args.data, args.cache_dir, summary=summary, vocabulary=args.vocabulary, **sets
        )
        result = pretrain(table, options, config)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"hymate-pretrain: error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    result.bundle.save(args.out / CHECKPOINT)
    record = {
        "objective": f"forecast every variable's mean z-score over the next {config.forecast_hours:g} hours (masked MSE)",
        "dataset": args.dataset,
        "data_summary": str(summary),
        "vocabulary": args.vocabulary,
        "stays": result.stays,
        "model": dataclasses.asdict(result.bundle.config),
        "pretraining": dataclasses.asdict(config),
        "best_epoch": result.best_epoch,
        "history": result.history,
        "seconds": round(result.seconds, 1),
    }
    atomic_write_text(args.out / "pretraining.json", json.dumps(record, indent=2))
    best = result.history[result.best_epoch - 1]
    print(
        f"pre-trained on {result.stays['train']} stays in {result.seconds:.0f} s; best epoch {result.best_epoch}: "
        f"validation MSE {best['val_mse']:.4f} (forecasting the mean: {best['val_mse_of_the_mean']:.4f})"
    )
    print(f"checkpoint: {args.out / CHECKPOINT} (start a training from it with --init-from)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
