"""Pre-training by forecasting, the checkpoint it writes, starting from it, and freezing parts of it."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hymate.centralized import train_centralized
from hymate.data import MomentSums, StayRecord, load_dataset, split_stays, table_from_stays
from hymate.data.batches import StayDataset, collate_stays
from hymate.model import HyMaTE, ModelOptions, freeze
from hymate.model_bundle import ModelBundle, initial_weights
from hymate.pretrain_cli import main as pretrain_main
from hymate.pretraining import ForecastDataset, PretrainConfig, pretrain
from hymate.train import TrainConfig, make_optimizer
from tests.test_data_eicu import write_eicu
from tests.test_data_physionet2019 import psv, write_p19

TINY = ModelOptions(d_model=8, n_mamba_layers=1, d_state=4, n_attention_layers=1, n_heads=2, dropout=0.0)
QUICK = PretrainConfig(epochs=2, batch_size=16, max_events=64, val_fraction=0.2, max_minutes=2.0)


def synthetic(stays: int = 40):
    return load_dataset("synthetic", n_sites=2, stays_per_site=stays, n_variables=4)


def test_a_forecast_sample_is_the_history_before_the_cut_and_the_next_hours_means():
    stay = StayRecord(
        "s", "p", "x", 0, [1.0], times=[0, 1, 1, 2, 2.5, 3, 9], variable_ids=[1, 2, 1, 1, 1, 2, 2],
        values=[10, 20, 30, 40, 50, 60, 70],
    )  # fmt: skip
    table = table_from_stays("t", ("a", "b"), ("s0",), [stay])
    normalizer = MomentSums.zeros(2, 1).to_normalizer()  # mean 0, std 1: z-scores are the values (clipped)
    normalizer = replace(normalizer, clip=1e6)
    data = ForecastDataset(table, normalizer, max_events=3, forecast_hours=2.0, seed=1)
    seen = set()
    for _ in range(60):
        history, target, mask = data[0]
        cut = min(t for t in table.times if t > history.times[-1])  # the cut is the next event time
        assert (history.times < cut).all() and len(history.times) <= 3
        expected = {1: [], 2: []}
        for t, v, value in zip(table.times, table.variable_ids, table.values, strict=True):
            if cut <= t < cut + 2:
                expected[int(v)].append(value)
        for k in (1, 2):
            assert mask[k - 1] == bool(expected[k])
            if expected[k]:
                assert target[k - 1] == pytest.approx(np.mean(expected[k]))
        seen.add(cut)
    assert seen == {1.0, 2.0, 2.5, 3.0, 9.0}  # every time after the first is a possible cut
    fixed = ForecastDataset(table, normalizer, 3, 2.0, seed=1, fixed_cuts=True)
    assert all(np.array_equal(fixed[0][1], fixed[0][1]) for _ in range(5))


def test_stays_that_cannot_be_cut_are_left_out():
    stays = [
        StayRecord("one", "p1", "x", 0, [1.0], [0.0], [1], [1.0]),
        StayRecord("same-time", "p2", "x", 0, [1.0], [2.0, 2.0], [1, 1], [1.0, 2.0]),
        StayRecord("empty", "p3", "x", 0, [1.0], [], [], []),
        StayRecord("ok", "p4", "x", 0, [1.0], [0.0, 1.0], [1, 1], [1.0, 2.0]),
    ]
    table = table_from_stays("t", ("a",), ("s0",), stays)
    data = ForecastDataset(table, MomentSums.from_table(table).to_normalizer(), 8, 2.0)
    assert list(data.rows) == [3]


def test_pretraining_learns_to_forecast_and_writes_a_hymate_bundle(tmp_path):
    table = synthetic(60)
    config = replace(QUICK, epochs=4, learning_rate=3e-3)
    result = pretrain(table, TINY, config)
    history = result.history
    assert len(history) == 4 and result.best_epoch >= 1
    assert history[-1]["train_mse"] < history[0]["train_mse"]
    assert min(h["val_mse"] for h in history) < history[0]["val_mse_of_the_mean"]  # beats forecasting the mean
    bundle = result.bundle
    assert bundle.variables == table.variables and bundle.config.d_model == 8
    bundle.save(tmp_path / "model.pt")
    loaded = ModelBundle.load(tmp_path / "model.pt")
    assert loaded.variables == bundle.variables and loaded.static_names == bundle.static_names
    for name, value in bundle.state_dict.items():
        assert torch.equal(loaded.state_dict[name], value), name
    np.testing.assert_array_equal(loaded.normalizer.value_mean, bundle.normalizer.value_mean)
    batch = collate_stays([StayDataset(table, loaded.normalizer, 64)[i] for i in range(5)])
    assert torch.isfinite(loaded.build()(batch)).all()


def test_initial_weights_check_vocabulary_and_shape(tmp_path):
    table = synthetic(20)
    model = HyMaTE(TINY.for_table(table))
    ModelBundle(TINY.for_table(table), model.state_dict(), MomentSums.from_table(table).to_normalizer(),
                table.variables, table.static_names).save(tmp_path / "model.pt")  # fmt: skip
    state = initial_weights(tmp_path / "model.pt", replace(TINY, dropout=0.3), table.variables, table.static_names)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # dropout is free
    with pytest.raises(ValueError, match=r"--d-model 8 --mamba-layers 1 .*this run asks for --d-model 16"):
        initial_weights(tmp_path / "model.pt", replace(TINY, d_model=16), table.variables, table.static_names)
    with pytest.raises(ValueError, match="--vocabulary shared"):
        initial_weights(tmp_path / "model.pt", TINY, ("HR", "Temp"), table.static_names)
    with pytest.raises(ValueError, match="--value-transform z; this run asks for asinh"):
        initial_weights(
            tmp_path / "model.pt", replace(TINY, value_transform="asinh"), table.variables, table.static_names
        )
    with pytest.raises(ValueError, match="cannot read the model file"):
        initial_weights(tmp_path / "missing.pt", TINY, table.variables, table.static_names)


def test_head_init_zero_starts_a_checkpoints_encoder_with_a_zero_head(tmp_path):
    table = synthetic(20)
    model = HyMaTE(TINY.for_table(table))
    ModelBundle(TINY.for_table(table), model.state_dict(), MomentSums.from_table(table).to_normalizer(),
                table.variables, table.static_names).save(tmp_path / "model.pt")  # fmt: skip
    state = initial_weights(tmp_path / "model.pt", replace(TINY, head_init="zero"), table.variables, table.static_names)
    assert not state["head.weight"].any() and not state["head.bias"].any()
    encoder = [k for k in state if not k.startswith("head.")]
    assert encoder and all(torch.equal(state[k], model.state_dict()[k]) for k in encoder)
    assert model.state_dict()["head.weight"].any()  # the checkpoint's own head is left as it was


def test_a_checkpoint_without_summaries_starts_a_summary_branch_model_as_it_was(tmp_path):
    table = synthetic(20)
    model = HyMaTE(TINY.for_table(table)).eval()
    normalizer = MomentSums.from_table(table).to_normalizer()
    ModelBundle(TINY.for_table(table), model.state_dict(), normalizer, table.variables, table.static_names).save(
        tmp_path / "model.pt"
    )
    with_summaries = replace(TINY, summary_branch=True)
    widened = HyMaTE(with_summaries.for_table(table)).eval()
    widened.load_state_dict(initial_weights(tmp_path / "model.pt", with_summaries, table.variables, table.static_names))
    batch = collate_stays([StayDataset(table, normalizer, 64)[i] for i in range(6)])
    assert widened.summaries(batch.variables, batch.values, batch.mask).abs().sum() > 0  # they are read...
    torch.testing.assert_close(widened(batch), model(batch))  # ...by zero weights: the checkpoint's function
    ModelBundle(with_summaries.for_table(table), widened.state_dict(), normalizer, table.variables,
                table.static_names).save(tmp_path / "summaries.pt")  # fmt: skip
    with pytest.raises(ValueError, match="reads the per-stay summaries .*repeat --summary-branch"):
        initial_weights(tmp_path / "summaries.pt", TINY, table.variables, table.static_names)


def _gradients(model: HyMaTE, table, part: str) -> dict[str, bool]:
    optimizer = make_optimizer(model, TrainConfig(freeze=part))
    normalizer = MomentSums.from_table(table).to_normalizer()
    batch = collate_stays([StayDataset(table, normalizer, 64)[i] for i in range(8)])
    optimizer.zero_grad()
    F.binary_cross_entropy_with_logits(model(batch), batch.label).backward()
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return {n: p.grad is not None and id(p) in trained for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "part, frozen",
    [("none", ()), ("embeddings", ("embedding.",)), ("backbone", ("embedding.", "mamba.", "attention."))],
)
def test_freeze_decides_which_parameters_get_gradients(part, frozen):
    table = synthetic(20)
    model = HyMaTE(TINY.for_table(table))
    got = _gradients(model, table, part)
    for name, has_gradient in got.items():
        assert has_gradient == (not name.startswith(frozen)), name
    assert any(got.values()) and {n for n in got if got[n]} >= {"head.weight", "pooling.proj.weight"}
    assert freeze(model, "none") == [] and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="unknown freeze choice 'mamba'"):
        freeze(model, "mamba")
    with pytest.raises(ValueError, match="freeze must be one of"):
        TrainConfig(freeze="mamba")


def test_fine_tuning_from_a_checkpoint_keeps_the_frozen_part(tmp_path):
    table = synthetic(40)
    bundle = pretrain(table, TINY, replace(QUICK, epochs=1)).bundle
    bundle.save(tmp_path / "model.pt")
    split = split_stays(table, seed=0)
    train, val = table.subset(split.train), table.subset(split.val)
    config = TrainConfig(epochs=1, batch_size=16, max_events=64, freeze="backbone")
    result = train_centralized(train, val, {}, TINY, config, init_from=str(tmp_path / "model.pt"))
    tuned = result.model.state_dict()
    for name, value in bundle.state_dict.items():
        same = torch.equal(tuned[name], value)
        assert same == name.startswith(("embedding.", "mamba.", "attention.")), name


def test_a_model_trained_in_the_shared_vocabulary_reads_another_sources_stays(tmp_path):
    records = {f"p{i:06d}": psv(range(1, 14), HR={h: 70 + 3 * h + i for h in range(1, 11)},
                                O2Sat={2: 95 + i % 4}, Temp={3: 36.5 + (i % 3) / 2}) for i in range(24)}  # fmt: skip
    p19 = load_dataset("physionet2019", write_p19(tmp_path / "p19", a=records, b={}), cache_dir=None,
                       vocabulary="shared", observation_hours=10, sets=("A",))  # fmt: skip
    bundle = pretrain(p19, TINY, replace(QUICK, epochs=1)).bundle
    eicu = load_dataset("eicu", write_eicu(tmp_path / "eicu"), cache_dir=None, vocabulary="shared")
    scores = bundle.build()(collate_stays([StayDataset(eicu, bundle.normalizer, 64)[i] for i in range(len(eicu))]))
    assert scores.shape == (len(eicu),) and torch.isfinite(scores).all()
    bundle.save(tmp_path / "model.pt")
    source = load_dataset("eicu", tmp_path / "eicu", cache_dir=None)  # eICU's own vocabulary: refused
    with pytest.raises(ValueError, match="--vocabulary shared"):
        initial_weights(tmp_path / "model.pt", TINY, source.variables, source.static_names)
    state = initial_weights(tmp_path / "model.pt", TINY, eicu.variables, eicu.static_names)
    assert state.keys() == bundle.state_dict.keys()


def test_hymate_pretrain_writes_the_checkpoint_and_its_record(tmp_path, capsys):
    records = {f"p{i:06d}": psv(range(1, 30), HR={h: 60 + h + i for h in range(1, 25)}, Resp={h: 15 + h % 3
               for h in range(1, 25, 2)}) for i in range(30)}  # fmt: skip
    root = write_p19(tmp_path / "p19", a=records, b={})
    argv = ["--data", str(root), "--sets", "A", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
            "--d-model", "8", "--mamba-layers", "1", "--d-state", "4", "--heads", "2", "--epochs", "1",
            "--batch-size", "8", "--val-fraction", "0.2"]  # fmt: skip
    assert pretrain_main(argv) == 0
    assert "checkpoint:" in capsys.readouterr().out
    bundle = ModelBundle.load(tmp_path / "out" / "pretrained.pt")
    record = json.loads((tmp_path / "out" / "pretraining.json").read_text())
    assert record["vocabulary"] == "shared" and record["dataset"] == "physionet2019"
    assert bundle.variables[:3] == ("HR", "RespRate", "SpO2") and record["history"][0]["epoch"] == 1
    assert pretrain_main(argv) == 2  # an existing checkpoint is never overwritten
    assert "already holds a pre-trained checkpoint" in capsys.readouterr().err
