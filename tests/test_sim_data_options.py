"""hymate-sim's data flags: --sets reaches the loader, --cache-dir and --no-cache reach every site."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.partition import SimulationManifest, open_partition
from hymate.data import DataError, load_dataset
from simulation.cli import build_parser, spec_from_args
from tests.test_data_physionet2012 import write_p12


def test_hymate_sim_sets_reach_the_loader(tmp_path):
    root = write_p12(tmp_path / "raw")
    args = build_parser().parse_args(
        ["--dataset", "physionet2012", "--data", str(root), "--sets", "A", "--no-cache", "--out", str(tmp_path / "o")]
    )
    spec = spec_from_args(args)
    assert spec.load_options() == {"sets": ["a"], "cache_dir": None}
    assert len(load_dataset(spec.dataset, spec.data, **spec.load_options())) == 3
    args = build_parser().parse_args(["--dataset", "physionet2019", "--sets", "a, b", "--out", str(tmp_path / "q")])
    assert spec_from_args(args).dataset_options == {"sets": ["A", "B"]}  # each source's own spelling
    args = build_parser().parse_args(["--dataset", "synthetic", "--sets", "a", "--out", str(tmp_path / "p")])
    with pytest.raises(
        ValueError, match="--sets applies to physionet2012 and physionet2019, not to --dataset synthetic"
    ):
        spec_from_args(args)


def test_hymate_sim_cache_dir_is_where_the_simulator_and_sites_cache(tmp_path):
    args = build_parser().parse_args(["--cache-dir", "rel/cache", "--out", str(tmp_path / "o")])
    assert spec_from_args(args).load_options()["cache_dir"] == str(Path("rel/cache").resolve())  # sites run elsewhere
    root = write_p12(tmp_path / "raw")
    args = build_parser().parse_args(
        ["--dataset", "physionet2012", "--data", str(root), "--sets", "a", "--cache-dir", str(tmp_path / "mine")]
        + ["--out", str(tmp_path / "p")]
    )
    spec = spec_from_args(args)
    manifest = tmp_path / "manifest.json"
    SimulationManifest("physionet2012", str(root), str(tmp_path / "state"), [], 0, spec.load_options()).save(manifest)
    with pytest.raises(DataError, match="partition 0 is not in"):  # the site loaded the dataset, then looked
        open_partition(str(manifest), 0)
    (entry,) = (tmp_path / "mine").iterdir()  # ... through the cache the simulator was told to use
    assert entry.name.startswith("physionet2012-a-v")


def test_require_both_classes_reaches_the_spec(tmp_path):
    assert not spec_from_args(build_parser().parse_args(["--out", str(tmp_path / "a")])).require_both_classes
    args = build_parser().parse_args(["--require-both-classes", "--out", str(tmp_path / "b")])
    assert spec_from_args(args).require_both_classes
