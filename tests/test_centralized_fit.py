"""Centralized fitting options: training on the validation stays too, and an EMA of the weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from hymate.centralized import train_centralized
from hymate.data import split_stays
from hymate.data.batches import StayDataset, make_loader
from hymate.data.normalization import MomentSums
from hymate.data.stays import concat_tables
from hymate.data.synthetic import SyntheticConfig, make_synthetic
from hymate.model import HyMaTE, ModelOptions
from hymate.train import TrainConfig, fit, learning_rate_schedule, make_optimizer, train_epoch

OPTIONS = ModelOptions(d_model=16, n_mamba_layers=1, n_attention_layers=1, n_heads=2, dropout=0.0)
CONFIG = TrainConfig(epochs=2, batch_size=16, max_events=32, patience=1, cosine_schedule=False, device="cpu")


@pytest.fixture(scope="module")
def split():
    table = make_synthetic(SyntheticConfig(n_sites=1, stays_per_site=100, seed=3))
    train, val, test = split_stays(table, fractions=(0.6, 0.2, 0.2), seed=0).tables(table)
    return train, val, test


def test_training_on_the_validation_stays_runs_every_epoch_on_both(split):
    train, val, test = split
    config = dataclasses.replace(CONFIG, epochs=3, validation_stays="train")
    result = train_centralized(train, val, {"test": test}, OPTIONS, config)
    assert result.fit.best is None and result.fit.best_epoch == 3
    assert [h["epoch"] for h in result.fit.history] == [1, 2, 3]  # patience 1 stopped nothing
    both = MomentSums.from_table(concat_tables([train, val])).to_normalizer()
    np.testing.assert_allclose(result.normalizer.value_mean, both.value_mean)  # the stays it was fitted on
    assert result.test["test"].n == len(test)


def test_early_stopping_stays_the_default_and_holds_the_validation_stays_out(split):
    train, val, _ = split
    result = train_centralized(train, val, {}, OPTIONS, CONFIG)
    assert result.fit.best is not None and result.fit.best.n == len(val)
    only_train = MomentSums.from_table(train).to_normalizer()
    np.testing.assert_allclose(result.normalizer.value_mean, only_train.value_mean)


def _loader(table, normalizer):
    return make_loader(StayDataset(table, normalizer, CONFIG.max_events), CONFIG.batch_size, False)


def test_the_moving_average_is_updated_after_every_step(split):
    train, _, _ = split
    normalizer = MomentSums.from_table(train).to_normalizer()
    torch.manual_seed(0)
    model = HyMaTE(OPTIONS.for_table(train))
    optimizer = make_optimizer(model, CONFIG)
    trajectory = []
    optimizer.register_step_post_hook(
        lambda *_: trajectory.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone())
    )
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
    train_epoch(model, _loader(train, normalizer), optimizer, torch.device("cpu"), 1.0, 1.0, averaged=averaged)
    assert len(trajectory) == len(_loader(train, normalizer)) > 2
    expected = trajectory[0]  # the first update copies the weights
    for step in trajectory[1:]:
        expected = 0.8 * expected + 0.2 * step
    got = torch.nn.utils.parameters_to_vector(averaged.module.parameters())
    torch.testing.assert_close(got, expected)


def test_with_an_ema_the_model_ends_on_the_averaged_weights_early_stopping_scored(split):
    train, val, _ = split
    normalizer = MomentSums.from_table(train).to_normalizer()
    config = dataclasses.replace(CONFIG, epochs=1, ema_decay=0.9)
    torch.manual_seed(0)
    model = HyMaTE(OPTIONS.for_table(train))
    twin = HyMaTE(OPTIONS.for_table(train))
    twin.load_state_dict(model.state_dict())
    result = fit(model, _loader(train, normalizer), _loader(val, normalizer), config, 1.0)

    averaged = AveragedModel(twin, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    optimizer = make_optimizer(twin, config)
    train_epoch(twin, _loader(train, normalizer), optimizer, torch.device("cpu"), 1.0, 1.0, averaged=averaged)
    for name, kept in model.state_dict().items():
        torch.testing.assert_close(kept, averaged.module.state_dict()[name])
    assert not torch.equal(model.state_dict()["head.weight"], twin.state_dict()["head.weight"])  # not the raw weights
    assert result.best is not None and result.best_epoch == 1


@pytest.mark.parametrize(("field", "value", "message"), [
    ("ema_decay", 1.0, r"ema_decay must be in \[0, 1\), got 1.0"),
    ("ema_decay", -0.1, r"ema_decay must be in \[0, 1\)"),
    ("validation_stays", "ignore", "validation-stays must be one of early-stop, train"),
    ("warmup_epochs", -0.5, r"warmup_epochs must be in \[0, epochs=30\), got -0.5"),
    ("warmup_epochs", 30, r"warmup_epochs must be in \[0, epochs=30\), got 30"),
])  # fmt: skip
def test_bad_fitting_options_are_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def _factors(config: TrainConfig, steps_per_epoch: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = learning_rate_schedule(optimizer, config, steps_per_epoch)
    factors = []
    for _ in range(config.epochs * steps_per_epoch):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return factors


def test_the_warm_up_ramps_linearly_then_the_cosine_decays_over_the_remaining_steps():
    factors = _factors(TrainConfig(epochs=3, warmup_epochs=0.5), steps_per_epoch=4)
    assert factors[:2] == pytest.approx([0.5, 1.0])  # 2 warm-up steps: half an epoch of 4
    remaining = 10
    assert factors[2:] == pytest.approx([0.5 * (1 + np.cos(np.pi * k / remaining)) for k in range(remaining)])


def test_without_a_warm_up_the_schedule_is_the_cosine_over_every_step_or_none():
    assert _factors(TrainConfig(epochs=2), steps_per_epoch=3) == pytest.approx(
        [0.5 * (1 + np.cos(np.pi * k / 6)) for k in range(6)]
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert learning_rate_schedule(optimizer, TrainConfig(cosine_schedule=False), 5) is None
    constant = _factors(TrainConfig(epochs=2, warmup_epochs=1, cosine_schedule=False), steps_per_epoch=2)
    assert constant == pytest.approx([0.5, 1.0, 1.0, 1.0])
