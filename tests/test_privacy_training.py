"""Noise calibration and a site's DP round end to end on synthetic data."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from hymate.data import MomentSums, load_dataset
from hymate.data.batches import StayDataset
from hymate.model import HyMaTE, ModelOptions, freeze
from hymate.privacy import (
    DPConfig,
    PrivacyBudgetExhausted,
    PrivacyLedger,
    compose_epsilon,
    plan_round,
    poisson_schedule,
    train_private_round,
)
from hymate.train import ProximalTerm, TrainConfig, make_optimizer, positive_class_weight


def test_poisson_schedule():
    assert poisson_schedule(1000, 32) == (0.032, 32)
    assert poisson_schedule(100, 30) == (0.3, 4)
    assert poisson_schedule(20, 32) == (1.0, 1)
    with pytest.raises(ValueError):
        poisson_schedule(0, 32)


@pytest.mark.parametrize(("accountant", "target"), [("rdp", 1.0), ("rdp", 8.0), ("prv", 3.0)])
def test_the_calibrated_noise_spends_the_target_over_the_planned_rounds(tmp_path, accountant, target):
    config = DPConfig(target_epsilon=target, delta=1e-5, accountant=accountant, planned_rounds=5)
    plan = plan_round(config, n_train=800, batch_size=32, local_epochs=2)
    assert plan.sample_rate == 0.04 and plan.steps_per_epoch == 25 and plan.steps == 50
    total = compose_epsilon([(plan.noise_multiplier, plan.sample_rate, 5 * plan.steps)], 1e-5, accountant)
    assert target - min(0.01, 0.002 * target) <= total <= target
    # The same budget, spent round by round through a ledger: all planned rounds fit, one more does not.
    ledger = PrivacyLedger.open(tmp_path, target, 1e-5, accountant)
    for _ in range(5):
        assert ledger.can_afford(plan.noise_multiplier, plan.sample_rate, plan.steps)
        ledger.record(plan.noise_multiplier, plan.sample_rate, plan.steps)
    assert ledger.epsilon_spent == pytest.approx(total, rel=1e-9)
    assert not ledger.can_afford(plan.noise_multiplier, plan.sample_rate, plan.steps)


def test_dp_config_is_validated(monkeypatch):
    with pytest.raises(ValueError, match="target_epsilon"):
        DPConfig(target_epsilon=0.0, delta=1e-5)
    with pytest.raises(ValueError, match="delta"):
        DPConfig(target_epsilon=1.0, delta=1.0)
    with pytest.raises(ValueError, match="accountant"):
        DPConfig(target_epsilon=1.0, delta=1e-5, accountant="gdp")
    with pytest.raises(ValueError, match="planned_rounds"):
        DPConfig(target_epsilon=1.0, delta=1e-5, planned_rounds=0)

    def too_low(**_):
        raise ValueError("The privacy budget is too low.")

    monkeypatch.setattr("opacus.accountants.utils.get_noise_multiplier", too_low)
    with pytest.raises(ValueError, match="no noise multiplier reaches epsilon 0.001 .* budget is too low"):
        plan_round(DPConfig(target_epsilon=1e-3, delta=1e-5, planned_rounds=7), 1000, 50, 3)


def test_the_optimizer_setting_picks_adamw_or_sgd_with_momentum_over_the_same_decay_groups(site):
    model = small_model(site[0])
    adamw = make_optimizer(model, TrainConfig(learning_rate=3e-3, weight_decay=0.05))
    sgd = make_optimizer(model, TrainConfig(learning_rate=0.5, optimizer="sgd", momentum=0.9, weight_decay=0.05))
    assert isinstance(adamw, torch.optim.AdamW) and type(sgd) is torch.optim.SGD
    assert [g["weight_decay"] for g in sgd.param_groups] == [g["weight_decay"] for g in adamw.param_groups]
    assert [len(g["params"]) for g in sgd.param_groups] == [len(g["params"]) for g in adamw.param_groups]
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["lr"] == 0.5
    with pytest.raises(ValueError, match="optimizer must be one of adamw, sgd, got 'adam'"):
        TrainConfig(optimizer="adam")


@pytest.fixture(scope="module")
def site():
    table = load_dataset("synthetic", cache_dir=None, n_sites=1, stays_per_site=96, seed=3)
    dataset = StayDataset(table, MomentSums.from_table(table).to_normalizer(), max_events=64)
    return table, dataset


def small_model(table) -> HyMaTE:
    torch.manual_seed(0)
    options = ModelOptions(d_model=16, n_mamba_layers=1, d_state=4, n_attention_layers=1, n_heads=2, dropout=0.1)
    return HyMaTE(options.for_table(table))


def test_a_dp_round_trains_records_and_then_refuses(tmp_path, site):
    table, dataset = site
    config = DPConfig(target_epsilon=2.0, delta=1e-5, max_grad_norm=1.0, planned_rounds=2)
    plan = plan_round(config, len(dataset), batch_size=16, local_epochs=1)
    ledger = PrivacyLedger.open(tmp_path, config.target_epsilon, config.delta, config.accountant)
    model = small_model(table)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = TrainConfig(learning_rate=3e-3)

    results = []
    for r in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no stray warnings from Opacus on the training path
            results.append(
                train_private_round(
                    model, dataset, make_optimizer(model, train), plan, config, ledger,
                    device=torch.device("cpu"), pos_weight=positive_class_weight(table.labels), label=f"round {r + 1}",
                )
            )  # fmt: skip
    first, second = results
    assert np.isfinite(first.train_loss) and np.isfinite(second.train_loss)
    assert 0 < first.epsilon_spent < second.epsilon_spent <= config.target_epsilon
    assert second.epsilon_round == pytest.approx(second.epsilon_spent - first.epsilon_spent)
    assert second.metrics()["dp-epsilon"] == second.epsilon_spent and second.rounds_trained == 2
    assert ledger.history == ((plan.noise_multiplier, plan.sample_rate, 2 * plan.steps),)
    # The model trained in place, came back clean (same keys, no Opacus state), and changed.
    assert list(model.state_dict()) == list(before)
    assert max((model.state_dict()[k] - before[k]).abs().max().item() for k in before) > 1e-3
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())

    with pytest.raises(PrivacyBudgetExhausted, match="over the target 2"):
        train_private_round(
            model, dataset, make_optimizer(model, train), plan, config, ledger,
            device=torch.device("cpu"), pos_weight=1.0,
        )  # fmt: skip
    assert ledger.rounds_trained == 2 and len(ledger.refusals) == 1


def test_fedprox_pulls_the_noised_step_toward_the_global_weights(tmp_path, site):
    table, dataset = site
    config = DPConfig(target_epsilon=50.0, delta=1e-5, max_grad_norm=1e-6, planned_rounds=1)  # clip ~ no data signal
    plan = plan_round(config, len(dataset), batch_size=48, local_epochs=1)
    ledger = PrivacyLedger.open(tmp_path, config.target_epsilon, config.delta)
    model = small_model(table)
    anchor = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    proximal = ProximalTerm(mu=1.0, anchor=anchor)
    distance = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True)).item()
    train_private_round(
        model, dataset, torch.optim.SGD(model.parameters(), lr=0.2), plan, config, ledger,
        device=torch.device("cpu"), pos_weight=1.0, proximal=proximal,
    )  # fmt: skip
    after = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True)).item()
    assert after < 0.5 * distance  # two SGD steps of mu * (w - a) at lr 0.2 shrink it by 0.8^2 (plus tiny noise)


@pytest.mark.parametrize("part", ["embeddings", "backbone"])
def test_dp_sgd_leaves_frozen_parameters_untouched(tmp_path, site, part):
    table, dataset = site
    config = DPConfig(target_epsilon=8.0, delta=1e-5, max_grad_norm=1.0, planned_rounds=1)
    plan = plan_round(config, len(dataset), batch_size=16, local_epochs=1)
    model = small_model(table)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = set(freeze(model, part))
    train_private_round(
        model, dataset, make_optimizer(model, TrainConfig(learning_rate=3e-3, freeze=part)), plan, config,
        PrivacyLedger.open(tmp_path, 8.0, 1e-5), device=torch.device("cpu"), pos_weight=1.0,
    )  # fmt: skip
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]) == (name in frozen), name  # no noise reaches a frozen one
