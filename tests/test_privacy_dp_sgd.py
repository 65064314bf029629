"""DP-SGD on HyMaTE: exact per-sample gradients, one scan per step, empty Poisson batches."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.validators import ModuleValidator
from torch import nn

from hymate.data import MomentSums, load_dataset
from hymate.data.batches import Batch, StayDataset
from hymate.model import HyMaTE, HyMaTEConfig, ModelOptions
from hymate.privacy import make_private
from hymate.privacy.grad_samplers import (
    GradSinkNotFilledError,
    attach_grad_sinks,
    conv1d_grad_sample,
    detach_grad_sinks,
)
from hymate.ssm import cpu_kernel
from hymate.train import train_epoch
from tests.test_model import random_batch

FIELDS = ("times", "variables", "values", "mask", "static", "static_mask", "label")


@pytest.fixture(autouse=True)
def _quiet_backward_hook_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


def tiny_model(backend: str, dtype=torch.float64) -> HyMaTE:
    torch.manual_seed(0)
    config = HyMaTEConfig(
        n_variables=7, n_static=3, d_model=16, d_state=4, n_heads=2, dropout=0.0,
        n_mamba_layers=1, n_attention_layers=1, scan_backend=backend,
    )  # fmt: skip
    return HyMaTE(config).to(dtype).train()


def as_dtype(batch: Batch, dtype) -> Batch:
    columns = {f: getattr(batch, f) for f in FIELDS}
    return Batch(**{f: t.to(dtype) if t.is_floating_point() else t for f, t in columns.items()})


def stay(batch: Batch, i: int, length: int) -> Batch:
    """Row ``i`` alone, cut to its own length (no padding at all)."""
    keep = max(length, 1)
    columns = {f: getattr(batch, f)[i : i + 1] for f in FIELDS}
    return Batch(**{f: t[:, :keep] if f in FIELDS[:4] else t for f, t in columns.items()})


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_per_sample_gradients_equal_one_backward_per_stay(backend):
    model = tiny_model(backend)
    attach_grad_sinks(model)
    private = GradSampleModule(model, loss_reduction="mean")
    lengths = [5, 12, 1, 9, 0, 12]
    batch = as_dtype(random_batch(lengths), torch.float64)
    F.binary_cross_entropy_with_logits(private(batch), batch.label).backward()
    per_sample = {name: p.grad_sample.clone() for name, p in model.named_parameters()}
    private._close()
    detach_grad_sinks(model)

    for i, length in enumerate(lengths):
        model.zero_grad()
        one = stay(batch, i, length)
        F.binary_cross_entropy_with_logits(model(one), one.label).backward()
        for name, p in model.named_parameters():
            assert per_sample[name].shape == (len(lengths), *p.shape), name
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-9, atol=1e-12, msg=f"{name}, stay {i}")
    # Opacus's Embedding sampler ignores padding_idx; the explicit mask keeps the padding row at zero.
    assert per_sample["embedding.variable.weight"][:, 0].abs().max().item() == 0.0
    assert per_sample["mamba.0.mixer.ssm.A_log"].abs().sum().item() > 0
    assert per_sample["mamba.0.mixer.ssm.D"].abs().sum().item() > 0


def test_the_default_model_passes_opacus_strict_validation():
    model = HyMaTE(HyMaTEConfig(n_variables=36, n_static=5))
    assert ModuleValidator.validate(model, strict=True) == []


def test_the_ssm_sampler_reads_the_sink_from_the_one_scan(monkeypatch):
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        kernel = getattr(cpu_kernel, f"scan_{name}")

        def counted(*args, _kernel=kernel, _name=name):
            calls[_name] += 1
            return _kernel(*args)

        monkeypatch.setattr(cpu_kernel, f"scan_{name}", counted)
    model = tiny_model("cpu", torch.float32)
    attach_grad_sinks(model)
    private = GradSampleModule(model, loss_reduction="mean")
    batch = random_batch([4, 7, 2])
    F.binary_cross_entropy_with_logits(private(batch), batch.label).backward()
    assert calls == {"forward": 1, "backward": 1}
    ssm = model.mamba[0].mixer.ssm
    assert ssm.A_log.grad_sample.shape == (3, *ssm.A_log.shape)
    # The per-sample gradients sum to the batch gradient (times the batch size, as Opacus scales a mean loss).
    torch.testing.assert_close(ssm.A_log.grad_sample.sum(0) / 3, ssm.A_log.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ssm.D.grad_sample.sum(0) / 3, ssm.D.grad, rtol=1e-5, atol=1e-7)
    assert ssm.grad_sink.dA is None  # read once, then cleared
    private._close()


def test_the_ssm_sampler_refuses_a_model_without_grad_sinks():
    model = tiny_model("cpu", torch.float32)
    private = GradSampleModule(model, loss_reduction="mean")  # no attach_grad_sinks
    batch = random_batch([4, 7])
    with pytest.raises(GradSinkNotFilledError, match="no DPGradSink"):
        F.binary_cross_entropy_with_logits(private(batch), batch.label).backward()
    private._close()


@pytest.mark.parametrize(
    ("channels", "groups", "kernel", "padding", "dilation"),
    [(6, 6, 4, 3, 1), (6, 6, 3, 4, 2), (4, 2, 4, 1, 1), (3, 1, 4, 0, 1)],
)
def test_the_conv1d_sampler_matches_opacus(channels, groups, kernel, padding, dilation):
    torch.manual_seed(1)
    layer = nn.Conv1d(channels, channels, kernel, groups=groups, padding=padding, dilation=dilation).double()
    x = torch.randn(5, channels, 11, dtype=torch.float64)
    out_len = 11 + 2 * padding - dilation * (kernel - 1)
    backprops = torch.randn(5, channels, out_len, dtype=torch.float64)
    ours = conv1d_grad_sample(layer, [x], backprops)
    reference = compute_conv_grad_sample(layer, [x], backprops)
    for p in (layer.weight, layer.bias):
        torch.testing.assert_close(ours[p], reference[p], rtol=1e-10, atol=1e-12)


def small_dataset(stays: int = 60) -> StayDataset:
    table = load_dataset("synthetic", cache_dir=None, n_sites=1, stays_per_site=stays)
    return StayDataset(table, MomentSums.from_table(table).to_normalizer(), max_events=32)


def test_empty_poisson_batches_still_take_a_noised_counted_step():
    dataset = small_dataset()
    options = ModelOptions(d_model=16, n_mamba_layers=1, d_state=4, n_heads=2, dropout=0.0)
    model = HyMaTE(options.for_table(dataset.table))
    before = [p.detach().clone() for p in model.parameters()]
    dp = make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), dataset,
        sample_rate=0.005, steps_per_epoch=6, noise_multiplier=1.0, max_grad_norm=1.0,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    batches = list(dp.loader)  # P(empty) = 0.995^60 = 0.74 per step
    empty = [b for b in batches if len(b) == 0]
    assert len(batches) == 6 and len(empty) >= 1 and any(len(b) for b in batches)
    assert empty[0].static.shape == (0, 3) and empty[0].times.shape == (0, 1)

    train_epoch(dp.model, batches, dp.optimizer, torch.device("cpu"), 1.0, max_grad_norm=None)
    assert dp.engine.accountant.history == [(1.0, 0.005, 6)]  # every step counted, empty or not
    assert dp.optimizer.empty_batches.pending == 0
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))  # noise moved them

    dp.optimizer.zero_grad()
    with pytest.raises(RuntimeError, match="without per-sample gradients"):
        dp.optimizer.step()  # no backward and no empty batch: a bug, not a noise step
    dp.close()
    assert model.mamba[0].mixer.ssm.grad_sink is None
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_length_sorted_physical_batches_give_the_same_dp_step():
    dataset = small_dataset()
    options = ModelOptions(d_model=16, n_mamba_layers=1, d_state=4, n_heads=2, dropout=0.0)
    models, draws = [], []
    for chunk in (None, 8):
        torch.manual_seed(0)
        model = HyMaTE(options.for_table(dataset.table))
        dp = make_private(
            model, torch.optim.SGD(model.parameters(), lr=1.0), dataset,
            sample_rate=0.5, steps_per_epoch=1, noise_multiplier=0.0, max_grad_norm=0.5,
            generator=torch.Generator().manual_seed(7), physical_batch_size=chunk,
        )  # fmt: skip
        batches = list(dp.loader)
        draws.append([len(b) for b in batches])
        train_epoch(dp.model, batches, dp.optimizer, torch.device("cpu"), 1.0, max_grad_norm=None)
        assert dp.engine.accountant.history == [(0.0, 0.5, 1)]  # one DP step either way
        dp.close()
        models.append(model)
    assert len(draws[0]) == 1 and len(draws[1]) > 2 and sum(draws[1]) == draws[0][0]
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
