"""A trained model's risks are probabilities: the positive class's loss weight is taken out of
the head (hymate.model.remove_class_weight) when training ends, centrally and in a federation."""

from __future__ import annotations

import math

import pytest
import torch

from hymate.data import split_stays
from hymate.data.batches import StayDataset, make_loader
from hymate.data.normalization import MomentSums
from hymate.data.synthetic import SyntheticConfig, make_synthetic
from hymate.model import HyMaTE, ModelOptions, remove_class_weight
from hymate.train import TrainConfig, fit, learning_rate_schedule, make_optimizer, train_epoch

OPTIONS = ModelOptions(d_model=16, n_mamba_layers=1, n_attention_layers=1, n_heads=2, dropout=0.0)
CONFIG = TrainConfig(epochs=1, batch_size=16, max_events=32, cosine_schedule=False, device="cpu")


@pytest.fixture(scope="module")
def stays():
    table = make_synthetic(SyntheticConfig(n_sites=1, stays_per_site=60, seed=3))
    train = split_stays(table, fractions=(0.6, 0.2, 0.2), seed=0).tables(table)[0]
    normalizer = MomentSums.from_table(train).to_normalizer()
    return train, make_loader(StayDataset(train, normalizer, CONFIG.max_events), CONFIG.batch_size, False)


def _logits(model: HyMaTE, loader) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(batch) for batch in loader])


def test_removing_the_weight_divides_every_stays_odds_by_it_and_keeps_the_ranking(stays):
    train, loader = stays
    torch.manual_seed(0)
    model = HyMaTE(OPTIONS.for_table(train))
    before = _logits(model, loader)
    remove_class_weight(model.state_dict(), 4.0)  # the model's own state dict: in place
    after = _logits(model, loader)
    torch.testing.assert_close(after, before - math.log(4.0))
    assert torch.equal(torch.argsort(after), torch.argsort(before))


def test_a_weighted_fit_ends_on_the_trained_weights_with_the_weight_out_of_the_head(stays):
    train, loader = stays
    torch.manual_seed(0)
    model, twin = HyMaTE(OPTIONS.for_table(train)), HyMaTE(OPTIONS.for_table(train))
    twin.load_state_dict(model.state_dict())
    fit(model, loader, None, CONFIG, 4.0)

    optimizer = make_optimizer(twin, CONFIG)
    scheduler = learning_rate_schedule(optimizer, CONFIG, len(loader))
    train_epoch(twin, loader, optimizer, torch.device("cpu"), 4.0, CONFIG.clip_grad_norm, scheduler=scheduler)
    trained = twin.state_dict()
    for name, value in model.state_dict().items():
        expected = trained[name] - math.log(4.0) if name == "head.bias" else trained[name]
        torch.testing.assert_close(value, expected, msg=name)
