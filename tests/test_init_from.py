"""A federation started from a pre-trained checkpoint: the coordinator's checks, and hymate-sim end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from hymate.data import MomentSums, load_dataset
from hymate.model import HyMaTE
from hymate.model_bundle import Initialisation, ModelBundle
from hymate.pretraining import PretrainConfig, pretrain
from server.federation import Federation, FederationError
from server.model_card import sha256_of
from server.run_dir import RunDirectory
from simulation.cli import main
from tests.deployment import ONE_RAY_CLUSTER_AT_A_TIME
from tests.fake_grid import STATIC, VARIABLES, FakeGrid, FakeSite, serverapp_identity
from tests.test_pretraining import TINY
from tests.test_site_identity import settings

SITES = ["--synthetic-sites", "2", "--synthetic-stays", "80", "--bootstrap", "10"]
SHAPE = ["--d-model", "8", "--mamba-layers", "1", "--d-state", "4", "--attention-layers", "1", "--heads", "2"]


def checkpoint(folder):
    table = load_dataset("synthetic", n_sites=2, stays_per_site=80)  # the public data's stand-in
    bundle = pretrain(table, replace(TINY, dropout=0.2), PretrainConfig(epochs=1, batch_size=32, max_events=64)).bundle
    bundle.save(folder / "model.pt")
    return folder / "model.pt", bundle


def fake_checkpoint(folder, variables):
    config = TINY.for_schema(len(variables), len(STATIC))
    torch.manual_seed(5)
    normalizer = MomentSums.zeros(len(variables), len(STATIC)).to_normalizer()
    bundle = ModelBundle(config, HyMaTE(config).state_dict(), normalizer, tuple(variables), tuple(STATIC))
    bundle.save(folder / "model.pt")
    return folder / "model.pt", bundle


def test_the_coordinator_starts_the_sites_from_the_checkpoint_and_says_so_in_the_card(tmp_path):
    path, bundle = fake_checkpoint(tmp_path, VARIABLES)
    s = settings(tmp_path, rounds=1, model=TINY, freeze="embeddings", initialisation=Initialisation(str(path)))
    grid = FakeGrid([FakeSite(11), FakeSite(12)])  # they send back what they received
    with serverapp_identity(run_id=7):
        card = Federation(grid, s, run_id=7).run()
    final = ModelBundle.load(RunDirectory(s.run_dir).model_file).state_dict
    assert all(torch.equal(final[k], v) for k, v in bundle.state_dict.items())
    assert card["training"]["init_from"]["sha256"] == sha256_of(path) and card["training"]["freeze"] == "embeddings"
    sent = [m for m in grid.sent if m.metadata.message_type.startswith("train")]
    assert sent and all(m.content["config"]["freeze"] == "embeddings" for m in sent)  # the plan carries it


def test_a_checkpoint_of_another_vocabulary_ends_the_run_before_round_one(tmp_path):
    path, _ = fake_checkpoint(tmp_path, ["HR", "SBP", "Temp"])
    s = settings(tmp_path, rounds=1, model=TINY, initialisation=Initialisation(str(path)))
    grid = FakeGrid([FakeSite(11)])
    with serverapp_identity(run_id=7), pytest.raises(FederationError, match="--vocabulary shared"):
        Federation(grid, s, run_id=7).run()
    assert not any(m.metadata.message_type.startswith("train") for m in grid.sent)


def test_a_checkpoint_of_another_shape_is_refused_before_any_training(tmp_path, capsys):
    path, _ = checkpoint(tmp_path)
    argv = SITES + ["--d-model", "16", "--init-from", str(path), "--out", str(tmp_path / "sim")]
    assert main(argv) == 2
    assert "this run asks for --d-model 16" in capsys.readouterr().err
    assert not (tmp_path / "sim").exists()


@pytest.mark.slow
@ONE_RAY_CLUSTER_AT_A_TIME
@pytest.mark.timeout(300)
def test_hymate_sim_federates_from_the_checkpoint_and_keeps_the_frozen_backbone(tmp_path, capsys):
    path, bundle = checkpoint(tmp_path)
    out = tmp_path / "sim"
    argv = SITES + SHAPE + ["--rounds", "1", "--max-events", "64", "--init-from", str(path), "--freeze", "backbone"]
    assert main(argv + ["--out", str(out)]) == 0, capsys.readouterr().err
    run = RunDirectory(out / "runs" / "federated-seed0")
    final = ModelBundle.load(run.model_file).state_dict
    for name, value in bundle.state_dict.items():
        frozen = name.startswith(("embedding.", "mamba.", "attention."))
        change = (final[name] - value).abs().max().item()
        # frozen: unchanged but for FedAvg's float rounding of equal arrays; the rest trained
        assert change < 1e-6 if frozen else change > 1e-5, (name, change)
    card = json.loads(run.model_card_file.read_text())
    assert card["training"]["init_from"] == {"path": str(path.resolve()), "sha256": sha256_of(path)}
    assert card["training"]["freeze"] == "backbone"
    assert "initial weights" in (out / "report.md").read_text()
