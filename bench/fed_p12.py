"""Federation recipes against the centralized model on the same test stays (PhysioNet 2012 by default).

Takes hymate-sim's flags (the same for every row) for the data, model and local training, trains the centralized model
for each training seed, then each ``--federation`` (extra hymate-sim flags: strategy, its options, rounds, local
epochs, ...) on the same sites, splits and test stays. Prints, side by side: pooled test
AUROC/AUPRC with bootstrap 95 % intervals, their means over the sites, rounds x local
epochs, wall time, each pooled AUROC over the centralized one of the same seed (issue 13
bar: >= 0.99) and the paired difference from it on the same stays (bootstrap 95 % interval);
with several ``--seeds``, each seed's row, the mean and sd over the seeds, and the paired
difference of the seeds' means. ``--predictions DIR`` writes each run's pooled test predictions as
it finishes (``DIR/<row>_seed<N>.npz``), so that a recipe measured in a later invocation pairs
with these rows through ``bench/pair_predictions.py`` (runs without DP are deterministic on CPU).

    python bench/fed_p12.py --d-model 32 --max-events 400 --batch-size 128 --learning-rate 3e-3 \\
        --federation "--strategy fedavg --rounds 10" \\
        --federation "--strategy fedadam --strategy-option eta=0.01 --local-epochs 2 --rounds 10" --seeds 0 1 2

The data default to .cache/data/physionet2012 (unpacked from ../shared/data/physionet2012.tar.gz),
natural partition (the 4 ICU types); ``--sets a`` keeps only set-a's 4,000 stays.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cli import ensure_data  # noqa: E402
from pair_predictions import save_predictions  # noqa: E402
from variants import paired_scores, plan_text, run_protocol, variant_spec  # noqa: E402

from simulation.cli import build_parser  # noqa: E402
from simulation.evaluation import Predictions  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--federation", action="append", default=[])
    own.add_argument("--no-centralized", action="store_true")
    own.add_argument("--predictions", type=Path, help="write each run's pooled test predictions here")
    args, base = own.parse_known_args(argv)
    if not args.federation:
        print("bench/fed_p12.py: give at least one --federation 'FLAGS' (see the docstring)", file=sys.stderr)
        return 2
    parser = build_parser()
    given = parser.parse_args(base)
    if given.data is None and "--dataset" not in base:  # PhysioNet 2012 unless another dataset is named
        base += ["--dataset", "physionet2012", "--data", str(ensure_data(None, "physionet2012"))]
        given = parser.parse_args(base)
    root = Path(tempfile.mkdtemp(prefix="hymate-bench-fed-"))
    print(f"runs in {root}", flush=True)

    seeds = given.seeds
    runs = [] if args.no_centralized else [("centralized", "", "centralized")]
    runs += [(flags, flags, "federated") for flags in args.federation]
    per_seed: dict[str, list[dict]] = {}
    pooled: dict[str, dict[int, Predictions]] = {}  # run -> seed -> pooled test predictions
    for i, (label, flags, protocol) in enumerate(runs):
        spec = variant_spec(parser, base, flags, root / f"run-{i}")
        plan = f"{spec.train.epochs} epochs max" if protocol == "centralized" else plan_text(spec)
        for seed in seeds:
            run = run_protocol(dataclasses.replace(spec, seeds=(seed,)), protocol)
            pooled.setdefault(label, {})[seed] = run.pooled
            if args.predictions:
                save_predictions(args.predictions, label, seed, run.pooled)
            paired = {}
            if protocol == "federated" and "centralized" in pooled:
                paired = paired_scores([run.pooled], [pooled["centralized"][seed]], "centralized", given.bootstrap)
            row = {"plan": plan, "seed": seed} | run.scores | paired | {"wall s": round(run.seconds)}
            per_seed.setdefault(label, []).append(row)
            print(f"{label}, seed {seed}: {row}", flush=True)

    frame = pd.DataFrame([row | {"run": label} for label, rows in per_seed.items() for row in rows])
    if "centralized" in per_seed:  # each seed's federation over the centralized model of the same seed
        reference = frame[frame["run"] == "centralized"].set_index("seed")["pooled AUROC"]
        frame["AUROC / centralized"] = frame["pooled AUROC"] / frame["seed"].map(reference)
    print(f"\nsplit seed {given.split_seed}, {given.partition} sites, the same test stays in every row")
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 80):
        print(frame.set_index(["run", "seed"]).to_string(float_format=lambda x: f"{x:.4f}"))
        if len(seeds) > 1:
            numbers = [c for c in frame.select_dtypes("number").columns if c != "seed"]
            summary = frame.groupby("run", sort=False)[numbers].agg(["mean", "std"])
            print(f"\nmean and sd over seeds {', '.join(map(str, seeds))}")
            print(summary.to_string(float_format=lambda x: f"{x:.4f}"))
            if "centralized" in pooled:
                print("\npaired on the same test stays, each side averaged over the seeds (bootstrap 95 % intervals)")
                for label in per_seed:
                    if label != "centralized":
                        both = [pooled[label][s] for s in seeds], [pooled["centralized"][s] for s in seeds]
                        print(f"{label}: {paired_scores(*both, 'centralized', given.bootstrap)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
