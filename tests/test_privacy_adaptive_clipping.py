"""Quantile-based adaptive clipping: the bound finds the quantile, every chunk of a logical batch
is counted, the accountant still sees the calibrated noise, and a site keeps its bound between
rounds (a corrupt bound file is refused before any budget is spent)."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client.site import DPSettings, SiteConfigError, SiteSettings, open_site
from client.training import build_model, train_locally, weights_of
from hymate.data import MomentSums
from hymate.data.batches import collate_stays
from hymate.local_plan import LocalPlan
from hymate.model import HyMaTE, ModelOptions
from hymate.privacy import (
    AdaptiveClipDPOptimizer,
    AdaptiveClipping,
    DPConfig,
    PrivacyLedger,
    make_private,
    plan_round,
    train_private_round,
)
from hymate.privacy.adaptive_clipping import CLIP_BOUND_FILE
from hymate.train import TrainConfig, make_optimizer, train_epoch
from tests.test_privacy_dp_sgd import small_dataset

OPTIONS = ModelOptions(d_model=16, n_mamba_layers=1, d_state=4, n_heads=2, dropout=0.0)


@pytest.fixture(autouse=True)
def _quiet_backward_hook_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


@pytest.mark.parametrize(("sigma", "batch"), [(1.0, 128), (0.6, 16), (3.0, 32), (12.0, 64)])
def test_the_gradient_and_count_noise_together_are_the_accounted_mechanism(sigma, batch):
    clipping = AdaptiveClipping.for_step(0.5, 0.2, batch, sigma)
    z = clipping.gradient_noise_multiplier(sigma)
    assert (z**-2 + (2 * clipping.count_noise_std) ** -2) ** -0.5 == pytest.approx(sigma, rel=1e-12)
    assert sigma < z <= sigma / np.sqrt(0.75) + 1e-12  # the count noise is never below sigma
    if (sigma, batch) == (1.0, 128):
        assert clipping.count_noise_std == 6.4 and z / sigma - 1 < 0.0031  # the paper's batch / 20
    with pytest.raises(ValueError, match="count noise 0.5 is too small for noise multiplier 1"):
        AdaptiveClipping(0.5, 0.2, 0.5).gradient_noise_multiplier(1.0)
    with pytest.raises(ValueError, match="clip quantile must be in"):
        AdaptiveClipping(1.0, 0.2, 1.0)


def _per_stay_gradient_norms(model: HyMaTE, dataset) -> np.ndarray:
    """Each stay's loss gradient norm by one backward per stay (what DP-SGD clips)."""
    norms = []
    for i in range(len(dataset)):
        batch = collate_stays([dataset[i]])
        model.zero_grad()
        F.binary_cross_entropy_with_logits(model(batch), batch.label).backward()
        norms.append(torch.sqrt(sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None)).item())
    return np.array(norms)


def _adaptive_run(dataset, quantile: float, steps: int, chunk: int | None, start: float = 1.0):
    torch.manual_seed(0)
    model = HyMaTE(OPTIONS.for_table(dataset.table))
    clipping = AdaptiveClipping.for_step(quantile, 0.5, 0.5 * len(dataset), 0.0)
    dp = make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), dataset,  # lr 0: the norms stay put
        sample_rate=0.5, steps_per_epoch=steps, noise_multiplier=0.0, max_grad_norm=start,
        generator=torch.Generator().manual_seed(5), physical_batch_size=chunk, clipping=clipping,
    )  # fmt: skip
    assert isinstance(dp.optimizer, AdaptiveClipDPOptimizer)
    bounds, count_step = [], dp.optimizer.step_hook

    def count_and_record(optimizer: AdaptiveClipDPOptimizer) -> None:
        count_step(optimizer)  # the accountant's hook
        bounds.append(optimizer.max_grad_norm)

    dp.optimizer.attach_step_hook(count_and_record)
    train_epoch(dp.model, list(dp.loader), dp.optimizer, torch.device("cpu"), 1.0, max_grad_norm=None)
    history = dp.engine.accountant.history
    dp.close()
    return model, bounds, history


def test_the_bound_settles_at_the_target_quantile_of_the_per_sample_norms():
    dataset = small_dataset()
    model, bounds, history = _adaptive_run(dataset, quantile=0.3, steps=60, chunk=None)
    assert history == [(0.0, 0.5, 60)]  # the accountant saw the plan's noise and every step
    norms = _per_stay_gradient_norms(model, dataset)
    unclipped = np.mean(norms <= np.mean(bounds[-20:]))
    assert 0.15 <= unclipped <= 0.45, (unclipped, bounds[-5:], np.quantile(norms, [0.1, 0.3, 0.5]))
    assert bounds[0] != 1.0 and len(set(bounds)) > 30  # it moved every step


def test_a_logical_batch_in_chunks_is_counted_whole():
    """Opacus's AdaClipDPOptimizer resets its count at every zero_grad, so in chunks it would count
    the last chunk only; here the chunked run follows the unchunked one bound for bound."""
    dataset = small_dataset()
    _, whole, _ = _adaptive_run(dataset, quantile=0.5, steps=12, chunk=None)
    _, chunked, _ = _adaptive_run(dataset, quantile=0.5, steps=12, chunk=4)
    np.testing.assert_allclose(chunked, whole, rtol=1e-9)


def test_an_empty_poisson_batch_raises_the_bound():
    dataset = small_dataset()
    torch.manual_seed(0)
    model = HyMaTE(OPTIONS.for_table(dataset.table))
    dp = make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), dataset,
        sample_rate=0.005, steps_per_epoch=6, noise_multiplier=1.0, max_grad_norm=1.0,
        generator=torch.Generator().manual_seed(3), clipping=AdaptiveClipping(0.5, 0.2, 1.0),
    )  # fmt: skip
    batches = list(dp.loader)
    assert sum(len(b) == 0 for b in batches) >= 1
    train_epoch(dp.model, batches, dp.optimizer, torch.device("cpu"), 1.0, max_grad_norm=None)
    assert dp.engine.accountant.history == [(1.0, 0.005, 6)]
    assert dp.optimizer.max_grad_norm > 1.0  # nothing (or next to nothing) unclipped: the bound grew
    dp.close()


def test_a_round_with_adaptive_clipping_spends_what_a_fixed_round_spends(tmp_path):
    dataset = small_dataset(80)
    spent, bounds = {}, {}
    for quantile in (None, 0.5):
        config = DPConfig(target_epsilon=4.0, delta=1e-5, max_grad_norm=1.0, planned_rounds=2, clip_quantile=quantile)
        plan = plan_round(config, len(dataset), batch_size=16, local_epochs=1)
        ledger = PrivacyLedger.open(tmp_path / str(quantile), config.target_epsilon, config.delta)
        model = HyMaTE(OPTIONS.for_table(dataset.table))
        first = train_private_round(
            model, dataset, make_optimizer(model, TrainConfig(optimizer="sgd", learning_rate=0.1)), plan, config,
            ledger, device=torch.device("cpu"), pos_weight=1.0,
        )  # fmt: skip
        second = train_private_round(
            model, dataset, make_optimizer(model, TrainConfig(optimizer="sgd", learning_rate=0.1)), plan, config,
            ledger, device=torch.device("cpu"), pos_weight=1.0, clip_bound=first.clip_bound,
        )  # fmt: skip
        assert ledger.history == ((plan.noise_multiplier, plan.sample_rate, 2 * plan.steps),)
        spent[quantile] = second.epsilon_spent
        bounds[quantile] = (first.clip_bound, second.metrics()["dp-clip-bound"])
    assert spent[0.5] == spent[None] <= 4.0
    assert bounds[None] == (1.0, 1.0)
    assert bounds[0.5][0] != 1.0 and bounds[0.5][1] != bounds[0.5][0]


def _site(tmp_path, **dp):
    return open_site(
        SiteSettings(dataset="synthetic", site="site-1", state_dir=tmp_path, dp=DPSettings(epsilon=8.0, **dp))
    )


def _plan(site):
    plan = LocalPlan(
        OPTIONS, MomentSums.from_table(site.train).to_normalizer(), batch_size=64, optimizer="sgd", learning_rate=0.1
    )
    return dataclasses.replace(plan, planned_rounds=2)


@pytest.mark.slow  # two DP-SGD rounds on a whole synthetic site: about 20 s
def test_a_site_keeps_its_bound_between_rounds_and_refuses_a_corrupt_one_before_spending(tmp_path):
    site = _site(tmp_path, clip_quantile=0.5)
    plan = _plan(site)
    start = weights_of(build_model(plan, site))
    first = train_locally(plan, site, start, server_round=1)
    kept = json.loads((tmp_path / CLIP_BOUND_FILE).read_text())["clip_bound"]
    assert first.privacy["dp-clip-bound"] == kept
    assert first.privacy["dp-clip-bound"] != 1.0
    second = train_locally(plan, site, start, server_round=2)
    assert second.privacy["dp-clip-bound"] != first.privacy["dp-clip-bound"]

    (tmp_path / CLIP_BOUND_FILE).write_text("{not json")
    state_before = _files(tmp_path)
    with pytest.raises(ValueError, match=f"{CLIP_BOUND_FILE} is unreadable.*delete it to start again"):
        train_locally(plan, site, start, server_round=3)
    assert _files(tmp_path) == state_before  # the ledger unchanged: nothing spent, nothing recorded


def _files(root) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != CLIP_BOUND_FILE}


def test_a_fixed_bound_site_writes_no_bound_file_and_bad_settings_are_named(tmp_path):
    with pytest.raises(SiteConfigError, match="dp-clip-quantile=1.5 must be in"):
        DPSettings(epsilon=8.0, clip_quantile=1.5)
    with pytest.raises(SiteConfigError, match="dp-clip-learning-rate=0.0 must be a finite number > 0"):
        DPSettings(epsilon=8.0, clip_learning_rate=0.0)
    config = DPSettings(epsilon=8.0, clip_quantile=0.7, clip_learning_rate=0.1).for_rounds(3)
    assert (config.clip_quantile, config.clip_learning_rate, config.max_grad_norm) == (0.7, 0.1, 1.0)
    site = _site(tmp_path)
    plan = dataclasses.replace(_plan(site), planned_rounds=1)
    outcome = train_locally(plan, site, weights_of(build_model(plan, site)), server_round=1)
    assert outcome.privacy["dp-clip-bound"] == 1.0 and not (tmp_path / CLIP_BOUND_FILE).exists()
