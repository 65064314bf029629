"""Early sepsis warning on PhysioNet/CinC 2019 across hospitals: HyMaTE vs. tuned gradient boosting
and logistic regression.

The task is the README's: the first 24 ICU hours predict sepsis onset after them
(``hymate.data.physionet2019``; 15,703 stays at hospital A, 14,405 at B). Protocols
(``--protocols``):

- ``A->B``: develop at hospital A, test on every stay of hospital B; ``B->A`` the reverse.
  HyMaTE trains on a stratified 80/20 split of the developing hospital's stays and stops
  early on the 20 %; the baselines tune and fit on all of them.
- ``pooled``: each hospital split 80/10/10 (stratified, patient-level, by the seed); HyMaTE
  trains on both 80 % parts and stops on both 10 %; the baselines use both 90 %; the test set
  is both hospitals' 10 %.

Bounded for 2 CPU cores: ``--max-train-stays N`` draws a stratified random N of the
developing stays for every model alike (0: all), and ``--epochs`` defaults to 5. The output
is the same as bench/p12.py's (``OUT/results.csv``, ``OUT/predictions/``, the summary).

    python bench/p19.py --summary-branch --seeds 0 --max-train-stays 6000 --out runs/bench-p19
"""

from __future__ import annotations

import time

import numpy as np
from bench_cli import build_parser, ensure_data, hymate_settings, start
from comparison import header, run_baselines, run_hymate, summarise

from hymate.data import concat_tables, load_dataset, split_stays
from hymate.data.stays import StayTable

HOSPITALS = {"A": "hospital_A", "B": "hospital_B"}


def at_most(table: StayTable, n: int, seed: int) -> StayTable:
    """A stratified random ``n`` of ``table``'s stays (all of them when ``n`` is 0 or more than there are)."""
    if n <= 0 or n >= len(table):
        return table
    split = split_stays(table, fractions=(n / len(table), 1 - n / len(table), 0.0), seed=seed)
    return table.subset(np.sort(split.train))


def main() -> None:
    p = build_parser(__doc__, "bench-p19")
    p.set_defaults(epochs=5)
    p.add_argument("--protocols", nargs="+", choices=("A->B", "B->A", "pooled"), default=["A->B", "B->A", "pooled"])
    p.add_argument("--max-train-stays", type=int, default=0, help="cap on the developing stays (stratified draw)")
    args = p.parse_args()
    record = start(args)
    if record is None:
        return
    root = ensure_data(args.data, "physionet2019")
    t0 = time.perf_counter()
    every = load_dataset("physionet2019", root, vocabulary=args.vocabulary)
    hospital = {k: every.where_site(site) for k, site in HOSPITALS.items()}
    print(f"loaded {len(every)} stays in {time.perf_counter() - t0:.1f} s", flush=True)
    header()
    for protocol in args.protocols:
        for seed in args.seeds:
            if protocol == "pooled":
                parts = [split_stays(t, fractions=(0.8, 0.1, 0.1), seed=seed).tables(t) for t in hospital.values()]
                train, val, test = (
                    concat_tables([p[i] for p in parts], name) for i, name in enumerate(("train", "val", "test"))
                )
                development = at_most(concat_tables([train, val], "development"), args.max_train_stays, seed)
                keep = set(development.stay_ids)
                train = train.subset(np.flatnonzero([s in keep for s in train.stay_ids]))
                val = val.subset(np.flatnonzero([s in keep for s in val.stay_ids]))
                test_name = "A+B split"
            else:
                source, target = protocol.split("->")
                development, test = at_most(hospital[source], args.max_train_stays, seed), hospital[target]
                train, val = split_stays(development, fractions=(0.8, 0.2, 0.0), seed=seed).tables(development)[:2]
                test_name = HOSPITALS[target]
            name = f"P19 {protocol}"
            if "baselines" in args.models:
                run_baselines(name, test_name, development, test, seed, record)
            if "hymate" in args.models:
                options, config = hymate_settings(args, seed)
                run_hymate(name, test_name, train, val, test, options, config, record, args.init_from)
    print(summarise(record, args.bootstrap))


if __name__ == "__main__":
    main()
