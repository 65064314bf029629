"""One vocabulary across hymate-server, hymate-client and hymate-sim; old spellings warn once."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import typing
from dataclasses import fields
from pathlib import Path

import pytest

from client import cli as client_cli
from client.site import DPSettings, SiteSettings
from hymate.cli_options import parse_with_config_file
from hymate.model import ModelOptions
from hymate.settings_fields import flag_of
from server import cli as server_cli
from simulation import cli as sim_cli

OLD_SPELLINGS = {"--lr", "--epsilon", "--delta", "--max-grad-norm"}
TRAINING = {"--learning-rate", "--batch-size", "--weight-decay", "--clip-grad-norm", "--max-events"}


def listed_flags(parser: argparse.ArgumentParser) -> set[str]:
    """The long flags --help lists (deprecated aliases are hidden)."""
    shown = {flag for a in parser._actions if a.help != argparse.SUPPRESS for flag in a.option_strings}
    text = parser.format_help()
    assert all(flag in text for flag in shown)
    return {f for f in shown if f.startswith("--")}


def test_the_three_commands_list_the_same_names_for_shared_settings():
    server, sim, client = (listed_flags(m.build_parser()) for m in (server_cli, sim_cli, client_cli))
    model = {flag_of(f) for f in fields(ModelOptions)}
    dp = {flag_of(f) for f in fields(DPSettings)}
    assert model == {
        "--d-model",
        "--mamba-layers",
        "--d-state",
        "--attention-layers",
        "--heads",
        "--dropout",
        "--scan-backend",
        "--summary-branch",
        "--head-init",
        "--value-transform",
    }
    assert dp == {
        "--dp-epsilon",
        "--dp-delta",
        "--dp-max-grad-norm",
        "--dp-accountant",
        "--dp-planned-rounds",
        "--dp-clip-quantile",
        "--dp-clip-learning-rate",
    }
    assert model | TRAINING | {"--rounds", "--local-epochs", "--strategy", "--strategy-option"} <= server & sim
    assert dp <= client & sim and not dp & server  # DP is the site's, never the coordinator's, to set
    assert "--config" in server & sim & client
    assert not OLD_SPELLINGS & (server | sim | client)


def test_server_and_sim_take_the_same_model_options():
    argv = ["--heads", "2", "--d-state", "8", "--mamba-layers", "3", "--scan-backend", "torch", "--summary-branch"]
    argv += ["--head-init", "zero", "--value-transform", "asinh"]
    sim = sim_cli.build_parser().parse_args(argv)
    server = server_cli.build_parser().parse_args(["--run-dir", "r", *argv])
    expected = ModelOptions(
        n_heads=2,
        d_state=8,
        n_mamba_layers=3,
        scan_backend="torch",
        summary_branch=True,
        head_init="zero",
        value_transform="asinh",
    )
    assert sim_cli.spec_from_args(sim).model == expected
    config = server_cli.run_config(server)
    assert (config["heads"], config["d-state"], config["mamba-layers"], config["scan-backend"]) == (2, 8, 3, "torch")
    assert config["summary-branch"] is True and config["head-init"] == "zero"
    assert config["value-transform"] == "asinh"


def test_lr_still_works_on_hymate_sim_and_warns_once(capsys):
    args = sim_cli.build_parser().parse_args(["--lr", "0.01", "--lr", "0.02"])
    assert args.learning_rate == 0.02
    assert capsys.readouterr().err.count("hymate-sim: warning: --lr is deprecated; use --learning-rate") == 1
    assert sim_cli.build_parser().parse_args([]).learning_rate == 1e-3
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "old, new, value",
    [("--epsilon", "dp_epsilon", 3.0), ("--delta", "dp_delta", 1e-6), ("--max-grad-norm", "dp_max_grad_norm", 2.0)],
)
def test_the_sites_old_dp_flags_still_work_and_warn(capsys, old, new, value):
    options = client_cli.merged_options(client_cli.build_parser().parse_args([old, str(value)]))
    assert options[new] == value
    assert f"hymate-client: warning: {old} is deprecated; use --dp-{old.removeprefix('--')}" in capsys.readouterr().err


def test_an_old_key_in_a_config_file_works_and_warns(tmp_path, capsys):
    path = tmp_path / "site.toml"
    path.write_text("epsilon = 4\n")
    options = client_cli.merged_options(client_cli.build_parser().parse_args(["--config", str(path)]))
    assert options["dp_epsilon"] == 4.0
    assert "epsilon (in --config" in capsys.readouterr().err
    sim = tmp_path / "sim.toml"
    sim.write_text("lr = 0.5\nrounds = 7\n")
    args = parse_with_config_file(sim_cli.build_parser(), ["--config", str(sim), "--rounds", "9"])
    assert (args.learning_rate, args.rounds) == (0.5, 9)  # the flag wins over the file
    assert "lr (in --config" in capsys.readouterr().err


def test_an_old_node_config_key_is_read_with_a_deprecation_line(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    settings = SiteSettings.from_node_config(
        {"dataset": "synthetic", "state-dir": str(tmp_path), "epsilon": "8", "max-grad-norm": "2"}
    )
    assert settings.dp == DPSettings(epsilon=8.0, max_grad_norm=2.0)
    assert "node config key 'epsilon' is deprecated; use 'dp-epsilon'" in caplog.text
    with pytest.raises(ValueError, match="both 'epsilon' and 'dp-epsilon'"):
        SiteSettings.from_node_config(
            {"dataset": "synthetic", "state-dir": str(tmp_path), "epsilon": "8", "dp-epsilon": "8"}
        )


def test_the_site_config_sends_the_new_node_config_keys(tmp_path):
    options = client_cli.merged_options(
        client_cli.build_parser().parse_args(
            ["--dataset", "synthetic", "--state-dir", str(tmp_path), "--dp-epsilon", "8"]
        )
    )
    config = client_cli.site_config(options)
    assert config["dp-epsilon"] == "8.0" and "epsilon" not in config
    assert SiteSettings.from_node_config(config).dp == DPSettings(epsilon=8.0)


def test_hymate_server_takes_a_config_file_and_its_flags_win(tmp_path):
    path = tmp_path / "federation.toml"
    path.write_text(f'run-dir = "{tmp_path / "run"}"\nrounds = 7\nlearning-rate = 0.01\nheads = 2\n')
    args = parse_with_config_file(server_cli.build_parser(), ["--config", str(path), "--rounds", "9"])
    config = server_cli.run_config(args)
    assert (config["num-server-rounds"], config["learning-rate"], config["heads"]) == (9, 0.01, 2)
    assert config["run-dir"] == str(tmp_path / "run")
    path.write_text("roundz = 7\n")
    assert server_cli.main(["--config", str(path)]) == 2


def test_init_certs_and_init_key_are_subcommands(capsys):
    for cli, command in ((server_cli, "init-certs"), (client_cli, "init-key")):
        parser = cli.build_parser()
        assert command in parser.format_help()
        with pytest.raises(SystemExit) as e:
            parser.parse_args([command, "--help"])
        assert e.value.code == 0
        assert f"usage: {parser.prog} {command}" in capsys.readouterr().out


def test_hymate_server_without_run_dir_says_so(capsys):
    assert server_cli.main(["--insecure"]) == 2
    assert "--run-dir is required" in capsys.readouterr().err


def test_the_sims_dp_flags_reach_every_virtual_site_as_dp_settings(tmp_path):
    from client.partition import Partition, SimulationManifest, open_partition
    from hymate.data import load_dataset

    spec = sim_cli.spec_from_args(
        sim_cli.build_parser().parse_args(["--dp-epsilon", "8", "--dp-accountant", "prv", "--out", str(tmp_path / "o")])
    )
    assert spec.privacy == DPSettings(epsilon=8.0, accountant="prv")
    assert sim_cli.spec_from_args(sim_cli.build_parser().parse_args(["--out", str(tmp_path / "p")])).privacy is None
    stays = [str(s) for s in load_dataset("synthetic", None, n_sites=2, stays_per_site=60).stay_ids[:60]]
    manifest = tmp_path / "manifest.json"
    SimulationManifest(
        dataset="synthetic",
        data=None,
        state_root=str(tmp_path / "sites"),
        partitions=[Partition("site-a", stays)],
        dataset_options={"n_sites": 2, "stays_per_site": 60},
        privacy=dataclasses.asdict(spec.privacy),
    ).save(manifest)
    assert open_partition(str(manifest), 0).settings.dp == spec.privacy


def test_secure_aggregation_has_one_flag_on_all_three_commands_and_reaches_each_side(tmp_path):
    argv = ["--secure-aggregation", "--secagg-reconstruction-threshold", "0.8"]
    server = server_cli.run_config(server_cli.build_parser().parse_args(["--run-dir", "r", *argv]))
    assert server["secure-aggregation"] is True and server["secagg-reconstruction-threshold"] == 0.8
    spec = sim_cli.spec_from_args(sim_cli.build_parser().parse_args(["--out", str(tmp_path / "sim"), *argv]))
    assert spec.secure_aggregation.enabled and spec.secure_aggregation.reconstruction_threshold == 0.8
    with pytest.raises(ValueError, match="'krum' cannot run under secure aggregation"):
        sim_cli.spec_from_args(sim_cli.build_parser().parse_args(["--strategy", "krum", *argv]))
    options = client_cli.merged_options(
        client_cli.build_parser().parse_args(
            ["--dataset", "synthetic", "--state-dir", str(tmp_path), "--secure-aggregation"]
        )
    )
    config = client_cli.site_config(options)
    assert config["secure-aggregation"] == "true"
    assert SiteSettings.from_node_config(config).secure_aggregation is True
    assert "secure-aggregation" not in client_cli.site_config({"dataset": "synthetic", "state_dir": str(tmp_path)})


def test_pretraining_and_vocabulary_flags_share_one_spelling(tmp_path):
    from hymate import pretrain_cli
    from hymate.local_plan import LocalPlan
    from server.settings import ServerSettings

    server, sim, client, pretrain = (
        listed_flags(m.build_parser()) for m in (server_cli, sim_cli, client_cli, pretrain_cli)
    )
    assert {"--init-from", "--freeze"} <= server & sim and not {"--init-from", "--freeze"} & client
    assert "--vocabulary" in sim & client & pretrain and "--vocabulary" not in server  # how data is read is the site's
    assert {flag_of(f) for f in fields(ModelOptions)} <= pretrain
    args = server_cli.build_parser().parse_args(
        ["--run-dir", "r", "--init-from", "pre/model.pt", "--freeze", "embeddings"]
    )
    config = server_cli.run_config(args)
    assert config["init-from"] == str(Path("pre/model.pt").resolve()) and config["freeze"] == "embeddings"
    settings = ServerSettings.from_run_config(config)
    assert settings.initialisation.init_from == config["init-from"] and settings.freeze == "embeddings"
    assert "init-from" not in LocalPlan.__dataclass_fields__ and LocalPlan.__dataclass_fields__["freeze"]
    spec = sim_cli.spec_from_args(
        sim_cli.build_parser().parse_args(
            [
                "--vocabulary",
                "shared",
                "--init-from",
                "pre/model.pt",
                "--freeze",
                "backbone",
                "--out",
                str(tmp_path / "o"),
            ]
        )
    )
    assert spec.dataset_options == {"vocabulary": "shared"} and spec.train.freeze == "backbone"
    assert spec.init_from == str(Path("pre/model.pt").resolve())
    options = client_cli.merged_options(client_cli.build_parser().parse_args(["--vocabulary", "shared"]))
    node = client_cli.site_config(options | {"dataset": "physionet2012", "state_dir": str(tmp_path)})
    assert node["vocabulary"] == "shared" and SiteSettings.from_node_config(node).vocabulary == "shared"
    with pytest.raises(ValueError, match="vocabulary='snomed' must be one of source, shared"):
        SiteSettings.from_node_config(node | {"vocabulary": "snomed"})


def test_hymate_server_has_a_flag_for_every_federation_setting_it_does_not_derive():
    """The README's recommended flags (--keep-round, --lr-schedule, --class-weight, ...) work on
    the coordinator's command as on hymate-sim; the settings not listed come from other flags."""
    from server.settings import ServerSettings

    derived = {"strategy_options", "registered_sites", "run_dir", "simulation_manifest"}  # --strategy-option, ...
    kinds = typing.get_type_hints(ServerSettings)
    wanted = []
    for f in fields(ServerSettings):
        if f.metadata.get("group"):  # every group a ServerSettings holds, a new one included
            wanted += fields(kinds[f.name])
        elif f.name not in derived:
            wanted.append(f)
    server = listed_flags(server_cli.build_parser())
    assert {flag_of(f) for f in wanted} - server == set()
    argv = ["--run-dir", "r", "--keep-round", "best-loss", "--lr-schedule", "cosine", "--class-weight", "site"]
    settings = ServerSettings.from_run_config(server_cli.run_config(server_cli.build_parser().parse_args(argv)))
    assert (settings.selection.keep_round, settings.lr_schedule, settings.class_weight) == (
        "best-loss",
        "cosine",
        "site",
    )
