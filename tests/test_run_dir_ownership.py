"""One owner of the run folder: the federation writes it, the simulation reads it back typed,
and no other module names a file in it (or, in simulation/, a key of the model card)."""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from flwr.app import ConfigRecord

from server.run_dir import RunDirectory, RunDirError
from simulation.report import curves_frame, privacy_frame
from tests.fake_grid import FakeGrid, FakeSite
from tests.test_site_identity import run, settings

ROOT = Path(__file__).resolve().parents[1]
OWNER = Path("server/run_dir.py")
#: Modules the owner's file names may not appear in: everything that ships or runs, tests aside.
SCANNED = ("server", "simulation", "client", "hymate", "strategies", "bench")
FILE_NAMES = (
    "federation.json",
    "events.jsonl",
    "model.pt",
    "model_card.json",
    "model_card.md",
    "metrics.csv",
    "metrics.json",
    "weights.npz",
    "strategy.pkl",
    "manifest.json",
    "run_config.toml",
)
ROUND_FOLDER = re.compile(
    r"(^|[./])round-(\d|\*|$)"
)  # round-001, f"round-{r:03d}", ".round-*.tmp"; not "round-started"
CARD_KEYS = ("privacy_spent_epsilon", "final_evaluation", "per_site", "weighted_mean", "rounds_completed")


@dataclass
class DPSite(FakeSite):
    """A fake site that reports its cumulative privacy spend with each update, as a DP site does."""

    epsilon_per_round: float = 0.25

    def reply(self, message, server_round):
        reply = super().reply(message, server_round)
        if reply is not None and message.metadata.message_type.startswith("train"):
            reply.content["privacy"] = ConfigRecord({"dp-epsilon": self.epsilon_per_round * server_round})
        return reply


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    s = settings(tmp_path_factory.mktemp("owner"), rounds=3, registered_sites=("hospital-1", "hospital-2"))
    grid = FakeGrid([DPSite(1, "hospital-1"), FakeSite(2, "hospital-2", positives=5)])
    run(grid, s)
    return RunDirectory(s.run_dir)


def test_the_layout_on_disk_is_unchanged(tmp_path):
    """Run folders written before the owner existed must still resume and read back."""
    d = RunDirectory(tmp_path)
    assert {
        "federation": d.federation_file,
        "events": d.events_file,
        "model": d.model_file,
        "card": d.model_card_file,
        "card-md": d.model_card_markdown_file,
        "metrics": d.metrics_table_file,
        "superlink": d.superlink_dir,
        "run-config": d.superlink_run_config_file,
        "manifest": d.simulation_manifest_file,
        "sites": d.site_state_root,
        "round 7": d.round_path(7),
        "round 1234": d.round_path(1234),
    } == {
        "federation": tmp_path / "federation.json",
        "events": tmp_path / "events.jsonl",
        "model": tmp_path / "model.pt",
        "card": tmp_path / "model_card.json",
        "card-md": tmp_path / "model_card.md",
        "metrics": tmp_path / "metrics.csv",
        "superlink": tmp_path / "superlink",
        "run-config": tmp_path / "superlink" / "run_config.toml",
        "manifest": tmp_path / "manifest.json",
        "sites": tmp_path / "sites",
        "round 7": tmp_path / "round-007",
        "round 1234": tmp_path / "round-1234",
    }


def test_a_federated_run_is_read_back_by_the_simulation_side_readers(finished_run):
    assert finished_run.is_finished()
    assert finished_run.completed_rounds() == [1, 2, 3]
    card = finished_run.model_card()
    assert card.rounds_completed == 3
    assert card.privacy_spent_epsilon == {"hospital-1": pytest.approx(0.75)}  # the last round's cumulative spend
    assert card.final_per_site["hospital-1"] == {"num-examples": 40, "auroc": 0.8, "auprc": 0.5, "loss": 0.4} | {
        "num-positives": 10
    }
    assert card.final_per_site["hospital-2"]["auroc"] == pytest.approx(0.8)
    assert card.final_weighted_mean["auroc"] == pytest.approx(0.8)
    assert card.final_weighted_mean["loss"] == pytest.approx(0.4)

    curves = finished_run.evaluation_curves()
    assert list(curves.columns) == ["round", "site", "metric", "value"]
    auroc = curves[curves["metric"] == "auroc"]
    assert sorted(auroc["round"].unique()) == [1, 2, 3]
    assert set(auroc["site"]) == {"hospital-1", "hospital-2", "weighted-mean"}
    assert auroc["value"].tolist() == pytest.approx([0.8] * 9)
    assert "train_loss" not in set(curves["metric"])  # evaluation only

    assert finished_run.read_facts().variables == ["HR", "SBP"]
    assert sorted(finished_run.read_facts().sites) == ["hospital-1", "hospital-2"]
    assert list(finished_run.load_model().variables) == ["HR", "SBP"]


def test_a_card_on_disk_reads_back_typed_with_undefined_metrics_as_nan(tmp_path):
    """The JSON exactly as the card writes it (NaN is stored as null)."""
    (tmp_path / "model_card.json").write_text(
        json.dumps(
            {
                "training": {"rounds_completed": 3, "kept_round": {"round": 2, "rule": "best"}},
                "privacy_spent_epsilon": {"hospital-1": 3},
                "final_evaluation": {
                    "weighted_mean": {"auroc": 0.7},
                    "per_site": {"hospital-1": {"auroc": None, "num-examples": 12}},
                    "per_site_95ci": {},
                },
            }
        )
    )
    card = RunDirectory(tmp_path).model_card()
    assert (card.rounds_completed, card.kept_round, card.kept_rule) == (3, 2, "best")
    assert (card.privacy_spent_epsilon, card.final_weighted_mean) == ({"hospital-1": 3.0}, {"auroc": 0.7})
    assert math.isnan(card.final_per_site["hospital-1"]["auroc"])
    assert card.final_per_site["hospital-1"]["num-examples"] == 12.0
    earlier = json.loads((tmp_path / "model_card.json").read_text())
    del earlier["training"]["kept_round"]  # a card written before keep-round: the last round's model
    (tmp_path / "model_card.json").write_text(json.dumps(earlier))
    assert (RunDirectory(tmp_path).model_card().kept_round, RunDirectory(tmp_path).model_card().kept_rule) == (
        3,
        "last",
    )
    (tmp_path / "model_card.json").write_text("{")
    with pytest.raises(RunDirError, match="model_card.json is unreadable"):
        RunDirectory(tmp_path).model_card()


def test_the_report_reads_privacy_and_curves_through_the_owner(finished_run, tmp_path):
    runs = {"fedavg": finished_run.path, "unfinished": tmp_path / "never-ran"}
    privacy = privacy_frame(runs)
    assert privacy.to_dict("records") == [{"run": "fedavg", "site": "hospital-1", "epsilon": pytest.approx(0.75)}]
    curves = curves_frame(runs)
    assert set(curves["run"]) == {"fedavg"}
    assert len(curves[curves["metric"] == "auroc"]) == 9
    assert privacy_frame({"none": tmp_path}).empty and curves_frame({"none": tmp_path}).empty
    assert isinstance(curves, pd.DataFrame)


def string_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string constant in the module but docstrings (f-strings: their literal parts)."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def run_folder_names_in(file: Path, relative: Path) -> list[str]:
    """Where ``file`` (``relative`` to the project) names a file of the run folder, or a card key in simulation/."""
    found = []
    for line, text in string_literals(ast.parse(file.read_text(), str(file))):
        names = [n for n in FILE_NAMES if n in text]
        names += ["round-NNN"] if ROUND_FOLDER.search(text) else []
        names += ["superlink/"] if text == "superlink" else []
        if relative.parts[0] == "simulation":
            names += [k for k in CARD_KEYS if text == k]
        found += [f"{relative}:{line}: {name} in {text!r}" for name in names]
    return found


def test_no_module_but_the_owner_names_a_file_of_the_run_folder():
    offenders = []
    for package in SCANNED:
        for file in sorted((ROOT / package).rglob("*.py")):
            relative = file.relative_to(ROOT)
            if relative != OWNER:
                offenders += run_folder_names_in(file, relative)
    assert offenders == []


def test_the_scan_catches_what_it_looks_for(tmp_path):
    """The scanner itself, on the spellings the old code used."""
    module = tmp_path / "m.py"
    module.write_text(
        '"""Docstrings may say model_card.json."""\n'
        'a = path / "metrics.csv"\n'
        'b = path / f"round-{r:03d}" / "weights.npz"\n'
        'c = card.get("privacy_spent_epsilon", {})\n'
        'd = path / "superlink"\n'
        'e = emit("round-started")\n'
    )
    found = run_folder_names_in(module, Path("simulation/m.py"))
    assert sorted(f.split(": ")[1].split(" in ")[0] for f in found) == [
        "metrics.csv",
        "privacy_spent_epsilon",
        "round-NNN",
        "superlink/",
        "weights.npz",
    ]


def test_the_federation_and_its_model_card_do_not_import_each_other():
    def imported(module: str) -> set[str]:
        tree = ast.parse((ROOT / module).read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
        }

    assert "server.federation" not in imported("server/model_card.py")
    assert "server.model_card" in imported("server/federation.py")
    assert "server.federation_facts" in imported("server/model_card.py") & imported("server/federation.py")
