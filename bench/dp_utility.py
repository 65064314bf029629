"""What differential privacy costs in utility, and which levers win it back.

Takes hymate-sim's flags (``--dp-epsilon`` is required), runs the federated protocol without
DP, then with DP at every site under those flags, then once per ``--lever`` (extra hymate-sim
flags on top: an optimiser, a batch size, a plan length, a clipping bound, ...), all on the
same partition, splits and test stays. Prints pooled test AUROC/AUPRC with 95 % intervals,
their means over the sites, wall time, each pooled AUROC over the non-DP one (issue 13
bar: at least 0.95 at epsilon 8, delta 1e-5), and every row's paired difference from the first
row on the same stays (bootstrap 95 % interval). The privacy ledger, the noise calibration and
the refusal are the sites' own, unchanged: a lever can only change how the budget is used.

    python bench/dp_utility.py --synthetic-stays 1500 --rounds 20 --local-epochs 2 \\
        --dp-epsilon 8 --dp-delta 1e-5 --batch-size 128 --learning-rate 3e-3 --dropout 0
    python bench/dp_utility.py --dataset physionet2012 --data .cache/data/physionet2012 --sets a \\
        --d-model 32 --max-events 400 --rounds 10 --batch-size 128 --learning-rate 3e-3 --dropout 0 \\
        --dp-epsilon 8 --dp-delta 1e-5 \\
        --lever "--optimizer sgd --momentum 0.9 --learning-rate 0.5" --lever "--batch-size 512 --rounds 20"

``--no-plain`` skips the non-DP run (ratios then need ``--plain-auroc``, a non-DP AUROC
measured on the same stays, e.g. by bench/fed_p12.py). ``--predictions DIR`` writes each row's
pooled test predictions as it finishes (``DIR/<row>_seed<N>.npz``: labels and probabilities, in
the fixed order of the split seed), so that rows of separate invocations pair afterwards with
``bench/pair_predictions.py`` (a DP row is a new noise draw every run: read a lever over seeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pair_predictions import save_predictions  # noqa: E402
from variants import paired_scores, plan_text, run_protocol, variant_spec  # noqa: E402

from simulation.cli import build_parser  # noqa: E402
from simulation.evaluation import Predictions  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--lever", action="append", default=[])
    own.add_argument("--no-plain", action="store_true")
    own.add_argument("--no-dp-base", action="store_true", help="run only the levers, not DP at the base flags")
    own.add_argument("--plain-auroc", type=float)
    own.add_argument("--predictions", type=Path, help="write each row's pooled test predictions here")
    args, base = own.parse_known_args(argv)
    parser = build_parser()
    root = Path(tempfile.mkdtemp(prefix="hymate-bench-dp-utility-"))
    private = variant_spec(parser, base, "", root / "check")
    if not private.privacy:
        print("bench/dp_utility.py: give --dp-epsilon (and --dp-delta): the budget of the DP runs", file=sys.stderr)
        return 2
    print(f"runs in {root}", flush=True)
    runs = [] if args.no_plain else [("non-DP", None)]
    runs += [] if args.no_dp_base else [("DP", "")]
    runs += [(f"DP {lever}", lever) for lever in args.lever]
    table: dict[str, dict] = {}
    reference: Predictions | None = None  # the first run's pooled predictions: every later run is paired with it
    for i, (label, flags) in enumerate(runs):
        spec = variant_spec(parser, base, flags or "", root / f"run-{i}")
        if flags is None:
            spec = dataclasses.replace(spec, privacy=None)
        run = run_protocol(spec, "federated")
        noise = "" if spec.privacy is None else f"planned rounds {spec.privacy.planned_rounds or spec.rounds}"
        paired = {} if reference is None else paired_scores([run.pooled], [reference], "first row", spec.bootstrap)
        reference = reference or run.pooled
        if args.predictions:
            save_predictions(args.predictions, label, spec.seeds[0], run.pooled)
        table[label] = {"plan": plan_text(spec), "dp": noise} | run.scores | paired | {"wall s": round(run.seconds)}
        print(f"{label}: {table[label]}", flush=True)

    frame = pd.DataFrame(table).T
    plain = table["non-DP"]["pooled AUROC"] if "non-DP" in table else args.plain_auroc
    if plain:
        frame["AUROC / non-DP"] = frame["pooled AUROC"] / plain
    budget = f"epsilon {private.privacy.epsilon:g}, delta {private.privacy.delta:g}"
    print(f"\nfederated, DP at every site: {budget}; seed {private.seeds[0]}, the same test stays in every row")
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 70):
        print(frame.to_string(float_format=lambda x: f"{x:.4f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
