"""Strategy registry: every name builds Flower's own strategy; bad names and options are clear errors."""

import pytest
import torch
from flwr.serverapp import strategy as flwr_strategies

from strategies.registry import STRATEGIES, StrategyError, StrategySpec, available, build_strategy


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_registered_name_builds_flowers_strategy_waiting_for_min_clients(name):
    strategy = build_strategy(StrategySpec(name), min_clients=3)
    assert isinstance(strategy, STRATEGIES[name])
    assert strategy.min_train_nodes == 3
    assert strategy.min_available_nodes == 3


def test_options_are_converted_to_the_constructors_types():
    strategy = build_strategy(StrategySpec.parse("fedprox", "proximal_mu=0.01"), 2)
    assert strategy.proximal_mu == pytest.approx(0.01)
    strategy = build_strategy(StrategySpec.parse("multikrum", ["num-malicious-nodes=1", "num_nodes_to_select=2"]), 4)
    assert (strategy.num_malicious_nodes, strategy.num_nodes_to_select) == (1, 2)


def test_central_dp_wraps_a_base_strategy():
    spec = StrategySpec.parse("dp-fixed", "base=fedadam noise_multiplier=0.5 clipping_norm=2.0")
    strategy = build_strategy(spec, 3)
    assert isinstance(strategy, flwr_strategies.DifferentialPrivacyServerSideFixedClipping)
    assert isinstance(strategy.strategy, flwr_strategies.FedAdam)
    assert strategy.noise_multiplier == 0.5 and strategy.clipping_norm == 2.0
    assert strategy.num_sampled_clients == 3


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(StrategyError, match="unknown strategy 'fedsgd'.*fedavg.*krum"):
        build_strategy(StrategySpec("fedsgd"), 2)


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(StrategyError, match="unknown option 'mu' for strategy 'fedprox'.*proximal_mu"):
        build_strategy(StrategySpec.parse("fedprox", "mu=0.1"), 2)


@pytest.mark.parametrize(
    "options, message",
    [("proximal_mu=lots", "not a valid float"), ("proximal_mu", "key=value"), ("min_train_nodes=5", "unknown option")],
)
def test_bad_option_values_are_errors(options, message):
    with pytest.raises(StrategyError, match=message):
        build_strategy(StrategySpec.parse("fedprox", options), 2)


class MyStrategy(flwr_strategies.FedAvg):
    """A user's own strategy, found by module:Class."""

    def __init__(self, boost: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.boost = boost


def test_module_class_reference_builds_a_users_strategy():
    strategy = build_strategy(StrategySpec.parse("tests.test_strategies:MyStrategy", "boost=2.5"), 2)
    assert isinstance(strategy, MyStrategy) and strategy.boost == 2.5


def test_module_class_reference_must_be_a_strategy():
    with pytest.raises(StrategyError, match="not a subclass"):
        build_strategy(StrategySpec("tests.test_strategies:test_unknown_strategy_lists_the_valid_ones"), 2)
    with pytest.raises(StrategyError, match="cannot load"):
        build_strategy(StrategySpec("no_such_module:Thing"), 2)


def test_available_names_cover_the_design():
    expected = {
        "fedavg",
        "fedprox",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "fedavgm",
        "fedmedian",
        "fedtrimmedavg",
        "krum",
        "multikrum",
        "bulyan",
        "qfedavg",
        "dp-fixed",
        "dp-adaptive",
        "dp-client-fixed",
    }
    assert set(available()) == expected


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_server_optimisers_run_a_federation_in_the_models_dtype(tmp_path, name):
    # Flower computes their aggregate in float64; the global model must stay the model's float32.
    from tests.fake_grid import FakeGrid, FakeSite
    from tests.test_site_identity import run, settings

    s = settings(tmp_path, strategy_name=name, strategy_options="eta=0.01")
    grid = FakeGrid([FakeSite(1, "hospital-1"), FakeSite(2, "hospital-2")])
    card = run(grid, s)
    assert card["rounds_by_site"] == {"hospital-1": [1, 2], "hospital-2": [1, 2]}
    evaluated = [m for m in grid.sent if m.metadata.message_type.startswith("evaluate")]
    assert evaluated and all(m.content["arrays"]["weights"].dtype == "float32" for m in evaluated)
    weights = torch.load(s.run_dir / "model.pt", weights_only=False)["state_dict"]
    assert {str(t.dtype) for t in weights.values() if t.is_floating_point()} == {"torch.float32"}
