"""Centralized HyMaTE vs. tuned gradient boosting and logistic regression on PhysioNet/CinC 2012 mortality.

Protocols (``--protocol``):

- ``lineage``: the HyMaTE paper's split. Test on set-a (4,000 stays); HyMaTE trains on an
  80/20 stratified split of sets b+c (the seed picks the split and the initialisation), the
  baselines on all 8,000 b+c stays (they tune and early-stop inside them).
- ``random5``: all 11,988 stays, 5 seeded, stratified, patient-level 80/10/10 splits in the
  manner of the Raindrop lineage (Raindrop, ViTST, ...). These are our own splits, made by
  ``hymate.data.split_stays`` with seeds 0-4, not the published split files, so published
  numbers on that protocol are for orientation only. HyMaTE trains on the 80 % and stops
  early on the 10 %; the baselines train on both (90 %). ``--seeds`` picks the splits.

HyMaTE's settings are the flags ``hymate-sim`` takes (``--summary-branch``, ``--d-model``,
``--learning-rate``, ...), so a result here is reproduced by ``hymate-sim --protocol
centralized`` with the same flags. Every run is printed and written to ``OUT/results.csv``
and ``OUT/predictions/`` as it finishes; the summary table (mean +- sd, paired difference
from gradient boosting with a bootstrap 95 % interval, wall time, peak RSS) comes at the end,
or from ``--summarise`` over an OUT folder at any time.

    python bench/p12.py --protocol lineage --seeds 0 1 2 --summary-branch --out runs/bench-p12
    python bench/p12.py --summarise --out runs/bench-p12

DIR defaults to .cache/data/physionet2012, unpacked from ../shared/data/physionet2012.tar.gz
when that archive is there. Report the machine's load (``uptime``) beside any time.
"""

from __future__ import annotations

import time

from bench_cli import build_parser, ensure_data, hymate_settings, start
from comparison import header, run_baselines, run_hymate, summarise

from hymate.data import concat_tables, load_dataset, split_stays


def main() -> None:
    p = build_parser(__doc__, "bench-p12")
    p.add_argument("--protocol", choices=("lineage", "random5"), default="lineage")
    args = p.parse_args()
    record = start(args)
    if record is None:
        return
    root = ensure_data(args.data, "physionet2012")
    t0 = time.perf_counter()
    by_set = {s: load_dataset("physionet2012", root, sets=(s,), vocabulary=args.vocabulary) for s in ("a", "b", "c")}
    print(f"loaded {sum(map(len, by_set.values()))} stays in {time.perf_counter() - t0:.1f} s", flush=True)
    header()
    for seed in args.seeds:
        if args.protocol == "lineage":
            development, test, test_name = concat_tables([by_set["b"], by_set["c"]], "set-bc"), by_set["a"], "set-a"
            split = split_stays(development, fractions=(0.8, 0.2, 0.0), seed=seed)
            train, val = development.subset(split.train), development.subset(split.val)
        else:
            every = concat_tables(list(by_set.values()), "set-abc")
            train, val, test = split_stays(every, fractions=(0.8, 0.1, 0.1), seed=seed).tables(every)
            development, test_name = concat_tables([train, val], "development"), f"split-{seed}"
        if "baselines" in args.models:
            run_baselines(args.protocol, test_name, development, test, seed, record)
        if "hymate" in args.models:
            options, config = hymate_settings(args, seed)
            run_hymate(args.protocol, test_name, train, val, test, options, config, record, args.init_from)
    print(summarise(record, args.bootstrap))


if __name__ == "__main__":
    main()
