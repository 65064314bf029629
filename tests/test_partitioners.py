"""Virtual-hospital partitions: disjoint, complete, deterministic, patient-level, skewed as asked."""

from pathlib import Path

import numpy as np
import pytest

import simulation.cli
from hymate.data import load_dataset
from hymate.data.synthetic import SyntheticConfig
from simulation.partitioners import PartitionError, PartitionScheme, partition_stays


@pytest.fixture(scope="module")
def table():
    return load_dataset("synthetic", config=SyntheticConfig(n_sites=4, stays_per_site=300, seed=3))


def _site_of_stay(parts: dict[str, np.ndarray], n: int) -> np.ndarray:
    owner = np.full(n, -1)
    for i, rows in enumerate(parts.values()):
        assert (owner[rows] == -1).all(), "a stay is in two sites"
        owner[rows] = i
    return owner


@pytest.mark.parametrize("scheme", ["natural", "iid", "dirichlet:0.5", "quantity:1.0"])
def test_partitions_are_disjoint_complete_deterministic_and_patient_level(table, scheme):
    parts = partition_stays(table, PartitionScheme.parse(scheme), n_sites=5, seed=11, min_size=5)
    owner = _site_of_stay(parts, len(table))
    assert (owner >= 0).all(), "a stay was left out"
    again = partition_stays(table, PartitionScheme.parse(scheme), n_sites=5, seed=11, min_size=5)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    for patient in np.unique(table.patient_ids):
        assert len(set(owner[table.patient_ids == patient])) == 1, f"patient {patient} is split across sites"


def test_natural_partition_follows_the_datasets_sites(table):
    parts = partition_stays(table, PartitionScheme.parse("natural"), n_sites=99)
    assert sorted(parts) == table.site_names()
    for name, rows in parts.items():
        assert set(table.sites[rows]) == {name}


def test_iid_sites_are_equal_in_size_and_a_different_seed_deals_differently(table):
    a = partition_stays(table, PartitionScheme.parse("iid"), 4, seed=1)
    b = partition_stays(table, PartitionScheme.parse("iid"), 4, seed=2)
    sizes = [len(r) for r in a.values()]
    assert max(sizes) - min(sizes) <= 0.1 * np.mean(sizes)
    assert any(not np.array_equal(a[k], b[k]) for k in a)


def _prevalence_spread(table, alpha: float) -> float:
    spreads = []
    for seed in range(5):
        parts = partition_stays(table, PartitionScheme("dirichlet", alpha), 4, seed=seed, min_size=1)
        spreads.append(np.std([table.labels[rows].mean() for rows in parts.values()]))
    return float(np.mean(spreads))


def test_dirichlet_label_skew_grows_as_alpha_shrinks(table):
    spread = [_prevalence_spread(table, alpha) for alpha in (100.0, 1.0, 0.2)]
    assert spread[0] < spread[1] < spread[2]
    assert spread[0] < 0.03


def test_quantity_skew_grows_as_alpha_shrinks(table):
    def size_spread(alpha):
        return np.mean(
            [
                np.std(
                    [
                        len(r)
                        for r in partition_stays(
                            table, PartitionScheme("quantity", alpha), 4, seed=s, min_size=1
                        ).values()
                    ]
                )
                for s in range(5)
            ]
        )

    assert size_spread(100.0) < size_spread(0.5)


def test_a_site_below_the_minimum_is_a_clear_error(table):
    with pytest.raises(PartitionError, match="below the minimum of 200 stays"):
        partition_stays(table, PartitionScheme.parse("iid"), 8, min_size=200)
    with pytest.raises(PartitionError, match="cannot fill"):
        partition_stays(table.subset(np.arange(3)), PartitionScheme.parse("iid"), 5)


@pytest.mark.parametrize("text", ["dirichlet", "dirichlet:-1", "quantity:x", "random"])
def test_bad_schemes_are_named(text):
    with pytest.raises(PartitionError, match=text.split(":")[0]):
        PartitionScheme.parse(text)


@pytest.mark.parametrize(
    ("scheme", "remedy"),
    [
        ("natural", "lower --min-site-size, or use another --partition (e.g. iid with --sites N)"),
        ("iid", "use fewer --sites or a lower --min-site-size"),
        ("dirichlet:0.3", "use fewer --sites, a larger ALPHA than 0.3 or a lower --min-site-size"),
        ("quantity:2", "use fewer --sites, a larger ALPHA than 2 or a lower --min-site-size"),
    ],
)
def test_the_minimum_size_error_suggests_what_applies_to_the_partition(table, scheme, remedy):
    with pytest.raises(PartitionError) as err:
        partition_stays(table, PartitionScheme.parse(scheme), 8, min_size=400)
    message = str(err.value)
    assert message.startswith(f"{scheme.split(':')[0]} partition leaves sites below the minimum of 400 stays (")
    assert message.endswith(remedy + (": the natural sites are fixed" if scheme == "natural" else ""))
    if scheme == "natural":
        assert "ALPHA" not in message and "fewer --sites" not in message


def _documented_partition_examples() -> list[list[str]]:
    """The hymate-sim command lines in README.md and hymate-sim's help that partition the default data."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text() + simulation.cli.__doc__
    lines = [line.split("hymate-sim", 1)[1] for line in text.splitlines() if "hymate-sim " in line]
    return [line.split() for line in lines if "--partition" in line and "--dataset" not in line]


@pytest.mark.parametrize("argv", _documented_partition_examples(), ids=" ".join)
def test_the_documented_partition_examples_work_on_the_default_data(argv):
    args, _ = simulation.cli.build_parser().parse_known_args(argv)
    scheme = PartitionScheme.parse(args.partition)
    parts = partition_stays(load_dataset("synthetic"), scheme, args.sites, args.split_seed, args.min_site_size)
    assert len(parts) == args.sites
