"""A site's optimiser state kept between rounds (``keep-optimizer-state``): it continues, it
stays at the site, it never carries the old round's hyper-parameters, and a state that does not
fit the optimiser is refused by name."""

import dataclasses

import pytest
import torch

from client.optimizer_state import FILE_NAME, load_optimizer_state, save_optimizer_state
from client.site import DPSettings, SiteSettings, open_site
from client.training import build_model, train_locally, weights_of
from hymate.data import MomentSums
from hymate.local_plan import LocalPlan
from hymate.model import ModelOptions
from hymate.train import TrainConfig, make_optimizer
from server.model_card import render_markdown
from tests.fake_grid import FakeGrid, FakeSite
from tests.test_site_identity import run, settings


def _site(state_dir, dp=None):
    return open_site(SiteSettings(dataset="synthetic", site="site-1", state_dir=state_dir, dp=dp))


def _plan(site, **changes):
    plan = LocalPlan(
        ModelOptions(d_model=16, n_heads=2), MomentSums.from_table(site.train).to_normalizer(), batch_size=64
    )
    return dataclasses.replace(plan, **changes)


def _steps_saved(state_dir) -> set[float]:
    saved = torch.load(state_dir / FILE_NAME, weights_only=True)
    return {float(entry["step"]) for entry in saved["state"].values()}


def test_a_kept_adamw_state_continues_from_round_to_round(tmp_path):
    site = _site(tmp_path)
    plan = _plan(site, keep_optimizer_state=True)
    steps_per_round = -(-len(site.train) // plan.batch_size)
    start = weights_of(build_model(plan, site))
    train_locally(plan, site, start, server_round=1)
    assert _steps_saved(tmp_path) == {steps_per_round}
    train_locally(dataclasses.replace(plan, learning_rate=1e-4), site, start, server_round=2)
    assert _steps_saved(tmp_path) == {2 * steps_per_round}  # continued, not restarted


def test_without_the_option_every_round_starts_afresh_and_nothing_is_written(tmp_path):
    site = _site(tmp_path)
    plan = _plan(site)
    train_locally(plan, site, weights_of(build_model(plan, site)), server_round=1)
    assert not (tmp_path / FILE_NAME).exists()


def test_the_plans_hyper_parameters_win_over_the_saved_ones(tmp_path):
    site = _site(tmp_path)
    model = build_model(_plan(site), site)
    old = make_optimizer(model, TrainConfig(learning_rate=3e-3, weight_decay=0.05))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    old.step()
    save_optimizer_state(old, "adamw", tmp_path)
    new = make_optimizer(model, TrainConfig(learning_rate=1e-4, weight_decay=0.0))
    assert load_optimizer_state(new, "adamw", tmp_path)
    assert {g["lr"] for g in new.param_groups} == {1e-4}
    assert {g["weight_decay"] for g in new.param_groups} == {0.0}
    assert {float(s["step"]) for s in new.state.values()} == {1.0}


def test_a_state_that_does_not_fit_is_a_named_error(tmp_path):
    site = _site(tmp_path)
    model = build_model(_plan(site), site)
    adamw = make_optimizer(model, TrainConfig())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    adamw.step()
    save_optimizer_state(adamw, "adamw", tmp_path)
    with pytest.raises(ValueError, match=f"{FILE_NAME} holds the state of optimiser 'adamw', not 'sgd'"):
        load_optimizer_state(make_optimizer(model, TrainConfig(optimizer="sgd")), "sgd", tmp_path)
    wider = build_model(_plan(site, model=ModelOptions(d_model=32, n_heads=2)), site)
    with pytest.raises(ValueError, match="of shape .* for a parameter of shape .*remove it to start"):
        load_optimizer_state(make_optimizer(wider, TrainConfig()), "adamw", tmp_path)


@pytest.mark.slow  # two DP-SGD rounds on a whole synthetic site: about 30 s
def test_a_dp_site_keeps_its_sgd_momentum_and_still_spends_its_budget(tmp_path):
    site = _site(tmp_path, dp=DPSettings(epsilon=8.0))
    plan = _plan(site, keep_optimizer_state=True, optimizer="sgd", learning_rate=0.1, planned_rounds=2)
    start = weights_of(build_model(plan, site))
    first = train_locally(plan, site, start, server_round=1)
    saved = torch.load(tmp_path / FILE_NAME, weights_only=True)
    assert saved["optimizer"] == "sgd" and all("momentum_buffer" in s for s in saved["state"].values())
    second = train_locally(plan, site, start, server_round=2)
    assert 0 < first.privacy["dp-epsilon"] < second.privacy["dp-epsilon"] <= 8.0


def test_the_plan_asks_for_it_and_the_card_says_how_the_sites_optimised(tmp_path):
    grid = FakeGrid([FakeSite(1, "h-1")])
    s = settings(tmp_path, optimizer="sgd", momentum=0.5, keep_optimizer_state=True, registered_sites=("h-1",))
    card = run(grid, s)
    trains = [m.content["config"] for m in grid.sent if m.metadata.message_type.startswith("train")]
    assert trains and all(config["keep_optimizer_state"] is True for config in trains)
    training = card["training"]
    assert (training["optimizer"], training["momentum"], training["keep_optimizer_state"]) == ("sgd", 0.5, True)
    assert "SGD with momentum 0.5, its state kept between rounds" in render_markdown(card, "model.pt")
    assert ", AdamW, " in render_markdown(card | {"training": training | {"optimizer": "adamw"}}, "model.pt")
