"""The command line bench/p12.py and bench/p19.py share: data, output, seeds, and HyMaTE's
settings as the flags ``hymate-sim`` takes (declared once, in the settings dataclasses)."""

from __future__ import annotations

import argparse
import logging
import os
import tarfile
from pathlib import Path

from comparison import RunRecord, summarise

from hymate.data import VocabularyChoice
from hymate.model import ModelOptions
from hymate.model_bundle import Initialisation
from hymate.settings_fields import add_flags, flag_values
from hymate.train import TRAIN_FLAGS, TrainConfig
from server.settings import ServerSettings, fixed_class_weight

ROOT = Path(__file__).resolve().parents[1]


def ensure_data(data: Path | None, name: str) -> Path:
    """``data``, or ``.cache/data/<name>`` unpacked from ../shared/data/<name>.tar.gz when needed."""
    if data is not None:
        return data
    target = ROOT / ".cache" / "data" / name
    archive = ROOT.parent / "shared" / "data" / f"{name}.tar.gz"
    if not target.exists():
        if not archive.exists():
            raise SystemExit(f"no {name} data: pass --data DIR or provide {archive}")
        with tarfile.open(archive) as tar:
            tar.extractall(target.parent, filter="data")
    return target


def build_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The flags bench/p12.py and bench/p19.py share; HyMaTE's are those of hymate-sim."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / out)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--models", nargs="+", choices=("baselines", "hymate"), default=["baselines", "hymate"])
    p.add_argument("--summarise", action="store_true", help="only print the summary of the runs in --out")
    p.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples")
    p.add_argument("-v", "--verbose", action="store_true")
    add_flags(p.add_argument_group("data"), VocabularyChoice)
    add_flags(p.add_argument_group("HyMaTE"), ModelOptions)
    add_flags(p.add_argument_group("HyMaTE"), Initialisation)
    training = p.add_argument_group("training")
    add_flags(training, TrainConfig, TRAIN_FLAGS, defaults={"epochs": 10})
    add_flags(training, ServerSettings, ("class_weight",))  # hymate-sim's flag: none is the unweighted loss
    return p


def hymate_settings(args: argparse.Namespace, seed: int) -> tuple[ModelOptions, TrainConfig]:
    """HyMaTE's model and training settings from the flags, with this run's seed."""
    return ModelOptions(**flag_values(ModelOptions, args)), TrainConfig(
        **flag_values(TrainConfig, args, TRAIN_FLAGS), seed=seed, pos_weight=fixed_class_weight(args.class_weight)
    )


def start(args: argparse.Namespace) -> RunRecord | None:
    """Logging, the run record in --out, and the machine's load printed beside the times to come;
    None once ``--summarise`` has printed the summary of the runs already there."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s")
    record = RunRecord(args.out)
    if args.summarise:
        print(summarise(record, args.bootstrap))
        return None
    load = os.getloadavg()
    print(f"results in {args.out}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    return record
