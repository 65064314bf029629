"""A federation started from a pre-trained checkpoint through hymate-sim, with the backbone frozen."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from hymate.data import load_dataset
from hymate.model_bundle import ModelBundle
from hymate.pretraining import PretrainConfig, pretrain
from server.model_card import sha256_of
from server.run_dir import RunDirectory
from simulation.cli import main
from tests.test_pretraining import TINY

SITES = ["--synthetic-sites", "2", "--synthetic-stays", "80", "--bootstrap", "10"]
SHAPE = ["--d-model", "8", "--mamba-layers", "1", "--d-state", "4", "--attention-layers", "1", "--heads", "2"]


def checkpoint(folder):
    table = load_dataset("synthetic", n_sites=2, stays_per_site=80)  # the public data's stand-in
    bundle = pretrain(table, replace(TINY, dropout=0.2), PretrainConfig(epochs=1, batch_size=32, max_events=64)).bundle
    bundle.save(folder / "model.pt")
    return folder / "model.pt", bundle


def test_a_checkpoint_of_another_shape_is_refused_before_any_training(tmp_path, capsys):
    path, _ = checkpoint(tmp_path)
    argv = SITES + ["--d-model", "16", "--init-from", str(path), "--out", str(tmp_path / "sim")]
    assert main(argv) == 2
    assert "this run asks for --d-model 16" in capsys.readouterr().err
    assert not (tmp_path / "sim").exists()


@pytest.mark.slow
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
        assert torch.equal(final[name], value) == frozen, name  # the sites trained only pooling, statics, head
    card = json.loads(run.model_card_file.read_text())
    assert card["training"]["init_from"] == {"path": str(path.resolve()), "sha256": sha256_of(path)}
    assert card["training"]["freeze"] == "backbone"
    assert "initial weights" in (out / "report.md").read_text()
