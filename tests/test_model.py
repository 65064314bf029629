"""HyMaTE model: padding invariance, empty stays, interpretability, backends agreeing."""

import math
from dataclasses import replace

import pytest
import torch

from hymate.data.batches import Batch
from hymate.model import HyMaTE, HyMaTEConfig


def random_batch(lengths: list[int], n_variables: int = 7, n_static: int = 3, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    b, length = len(lengths), max(lengths + [1])
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    times = torch.sort(torch.rand(b, length, generator=g) * 48, dim=1).values * mask
    variables = torch.randint(1, n_variables + 1, (b, length), generator=g) * mask
    values = torch.randn(b, length, generator=g) * mask
    static_mask = torch.rand(b, n_static, generator=g) > 0.3
    static = torch.randn(b, n_static, generator=g) * static_mask
    label = (torch.rand(b, generator=g) > 0.5).float()
    return Batch(times, variables, values, mask, static, static_mask, label)


def pad_more(batch: Batch, extra: int) -> Batch:
    """The same stays with ``extra`` more padding positions at the end, holding junk times/values."""

    def grow(t: torch.Tensor, fill) -> torch.Tensor:
        return torch.cat([t, torch.full((t.shape[0], extra), fill, dtype=t.dtype)], dim=1)

    return Batch(
        grow(batch.times, 99.0),
        grow(batch.variables, 0),
        grow(batch.values, 123.0),
        grow(batch.mask, False),
        batch.static,
        batch.static_mask,
        batch.label,
    )


def small_model(backend: str = "torch", **kw) -> HyMaTE:
    torch.manual_seed(0)
    config = HyMaTEConfig(
        n_variables=7, n_static=3, d_model=16, d_state=4, n_heads=2, dropout=0.0, scan_backend=backend, **kw
    )
    return HyMaTE(config).eval()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_padding_does_not_change_the_output(backend):
    model = small_model(backend, n_attention_layers=2)
    batch = random_batch([5, 12, 1, 9])
    with torch.no_grad():
        before = model(batch)
        after = model(pad_more(batch, 17))
    assert before.shape == (4,)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_a_stay_without_events_gets_a_finite_logit_from_its_static_features():
    model = small_model()
    batch = random_batch([0, 6, 3])
    with torch.no_grad():
        logits = model(batch)
        changed = batch.static.clone()
        changed[0] += 1.0
        logits_changed = model(
            Batch(batch.times, batch.variables, batch.values, batch.mask, changed, batch.static_mask, batch.label)
        )
    assert torch.isfinite(logits).all()
    assert logits_changed[0] != logits[0]
    torch.testing.assert_close(logits_changed[1:], logits[1:])


def test_backends_agree_on_logits_and_gradients():
    batch = random_batch([8, 20, 3])
    outputs = {}
    for backend in ("torch", "cpu"):
        model = small_model(backend).train()
        logits = model(batch)
        logits.sum().backward()
        outputs[backend] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(outputs["cpu"][0], outputs["torch"][0], rtol=1e-4, atol=1e-5)
    for name, grad in outputs["torch"][1].items():
        torch.testing.assert_close(outputs["cpu"][1][name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_variable_importance_is_a_distribution_over_observed_variables():
    model = small_model()
    batch = random_batch([5, 12, 9])
    importance = model.variable_importance(batch)
    assert importance.shape == (3, 8)
    torch.testing.assert_close(importance.sum(dim=1), torch.ones(3))
    assert torch.all(importance[:, 0] == 0)  # padding
    for row in range(3):
        unseen = set(range(1, 8)) - set(batch.variables[row][batch.mask[row]].tolist())
        for v in unseen:
            assert importance[row, v] == 0


def test_a_missing_event_changes_the_prediction():
    """The model reads the events at all (a guard against a scan or mask that zeroes everything)."""
    model = small_model()
    batch = random_batch([10, 10])
    shorter = random_batch([10, 10])
    shorter.mask[0, 9] = False
    shorter.variables[0, 9] = 0
    with torch.no_grad():
        a, b = model(batch), model(shorter)
    assert a[0] != b[0]
    torch.testing.assert_close(a[1], b[1])


def test_config_rejects_heads_that_do_not_divide_width():
    with pytest.raises(ValueError, match="divisible"):
        HyMaTEConfig(n_variables=3, n_static=1, d_model=10, n_heads=4)


def test_stay_summaries_are_each_variables_first_last_min_max_mean_and_log_count():
    from hymate.model import StaySummaries

    batch = random_batch([9, 14, 0, 3], n_variables=4, seed=3)
    got = StaySummaries(4)(batch.variables, batch.values, batch.mask).view(4, 6, 4)
    for row in range(4):
        real = batch.mask[row]
        for k in range(1, 5):
            seen = batch.values[row][real & (batch.variables[row] == k)]
            if len(seen):
                expected = [seen[0], seen[-1], seen.min(), seen.max(), seen.mean(), math.log1p(len(seen))]
            else:
                expected = [0.0] * 6
            torch.testing.assert_close(got[row, :, k - 1], torch.tensor(expected, dtype=torch.float32))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_the_summary_branch_ignores_padding_and_reads_the_events(backend):
    model = small_model(backend, summary_branch=True)
    plain = small_model(backend)
    batch = random_batch([5, 12, 1, 9])
    with torch.no_grad():
        before = model(batch)
        torch.testing.assert_close(model(pad_more(batch, 17)), before, rtol=1e-5, atol=1e-5)
        assert model.static.inner.in_features == plain.static.inner.in_features + 6 * 7
        # A changed value moves the logit through the summaries even with the sequence path cut off.
        for block in model.mamba:
            torch.nn.init.zeros_(block.mixer.out_proj.weight)
            torch.nn.init.zeros_(block.ffn.down.weight)
            torch.nn.init.zeros_(block.ffn.down.bias)
        torch.nn.init.zeros_(model.head.weight[:, :16])
        values = batch.values.clone()
        values[1, 0] += 2.0
        changed = Batch(batch.times, batch.variables, values, batch.mask, batch.static, batch.static_mask, batch.label)
        cut = model(batch)
        assert model(changed)[1] != cut[1]
        torch.testing.assert_close(model(changed)[[0, 2, 3]], cut[[0, 2, 3]])


@pytest.mark.parametrize("summary_branch", [False, True])
def test_asinh_values_are_the_z_model_fed_asinh_of_the_z_scores(summary_branch):
    """Both the event embedding and the summaries read the transformed values, and only them."""
    squashed = small_model(summary_branch=summary_branch, value_transform="asinh")
    plain = small_model(summary_branch=summary_branch)
    plain.load_state_dict(squashed.state_dict())
    batch = random_batch([5, 12, 1, 9])
    batch = replace(batch, values=batch.values * 6)  # tails where asinh differs from the identity
    fed = replace(batch, values=torch.asinh(batch.values))
    with torch.no_grad():
        torch.testing.assert_close(squashed(batch), plain(fed))
        assert not torch.allclose(squashed(batch), plain(batch), atol=1e-3)
    with pytest.raises(ValueError, match="value_transform 'log'"):
        HyMaTEConfig(n_variables=7, n_static=3, value_transform="log")


def test_a_zero_head_predicts_one_value_for_every_stay_until_it_trains():
    config = HyMaTEConfig(n_variables=7, n_static=3, d_model=16, n_heads=2, head_init="zero")
    torch.manual_seed(0)
    model = HyMaTE(config).eval()
    batch = random_batch([5, 9, 3, 12])
    assert torch.equal(model(batch), torch.zeros(4))
    torch.nn.functional.binary_cross_entropy_with_logits(model.train()(batch), batch.label).backward()
    assert model.head.weight.grad.abs().sum() > 0  # the first step gives the head its signs
    with pytest.raises(ValueError, match="head_init"):
        HyMaTEConfig(n_variables=7, n_static=3, head_init="xavier")
