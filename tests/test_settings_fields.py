"""Each setting is declared once, as a dataclass field; keys, flags and pyproject's table follow from it."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import pytest

from hymate.local_plan import LocalPlan
from hymate.model import ModelOptions
from hymate.settings_fields import RunConfigError, add_flags, flag_values, run_config_defaults
from hymate.train import TrainConfig
from server.settings import ServerSettings

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_run_config_holds_exactly_the_derived_keys_and_defaults():
    table = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert table == run_config_defaults(ServerSettings)


def test_derived_keys_keep_todays_names_and_the_two_clips_are_distinct():
    keys = run_config_defaults(ServerSettings)
    assert {"num-server-rounds", "mamba-layers", "attention-layers", "heads", "strategy", "strategy-options"} <= set(
        keys
    )
    assert "clip-grad-norm" in keys and "max-grad-norm" not in keys
    assert keys["num-server-rounds"] == 3 and keys["registered-sites"] == "" and keys["run-dir"] == "runs/federation"


def test_training_defaults_come_from_train_config():
    train, plan, server = TrainConfig(), LocalPlan.__dataclass_fields__, ServerSettings()
    names = ("batch_size", "learning_rate", "optimizer", "momentum", "weight_decay", "clip_grad_norm", "max_events")
    for name in (*names, "seed"):
        assert plan[name].default == getattr(train, name) == getattr(server, name), name


def test_a_run_config_builds_the_settings_with_nested_model_options():
    s = ServerSettings.from_run_config(
        {
            "num-server-rounds": 7,
            "heads": 2,
            "d-model": 32,
            "learning-rate": 1,
            "registered-sites": "a b",
            "run-dir": "x",
        }
    )
    assert (s.rounds, s.model.n_heads, s.model.d_model, s.learning_rate) == (7, 2, 32, 1.0)
    assert s.registered_sites == ("a", "b") and s.run_dir == Path("x")
    assert s.strategy.name == "fedavg"


@pytest.mark.parametrize(
    "config, message",
    [
        ({"heads": "2"}, "run config 'heads'='2' must be int"),
        ({"local-norms": 1}, "'local-norms'=1 must be bool"),
        ({"batch-size": True}, "'batch-size'=True must be int"),
        ({"num-server-rounds": 0}, "num-server-rounds must be at least 1"),
        ({"optimizer": "adam"}, "optimizer must be one of adamw, sgd, got 'adam'"),
        ({"class-weight": "pooled"}, "class-weight must be one of federation, site, none, got 'pooled'"),
        ({"keep-round": "first"}, "keep-round must be one of last, best, best-loss, got 'first'"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\), got 1.0"),
    ],
)
def test_a_mistyped_key_is_an_error_naming_it(config, message):
    with pytest.raises(RunConfigError, match=message):
        ServerSettings.from_run_config(config)


def test_flags_are_derived_from_the_fields():
    parser = argparse.ArgumentParser()
    add_flags(parser, ModelOptions)
    args = parser.parse_args(["--mamba-layers", "3", "--heads", "8", "--scan-backend", "torch"])
    assert ModelOptions(**flag_values(ModelOptions, args)) == ModelOptions(
        n_mamba_layers=3, n_heads=8, scan_backend="torch"
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--scan-backend", "gpu"])


def test_the_plan_carries_every_shared_training_setting():
    settings = ServerSettings(
        rounds=4, batch_size=8, clip_grad_norm=0.5, local_norms=True, optimizer="sgd", momentum=0.5,
        model=ModelOptions(n_heads=2),
    )  # fmt: skip
    plan = settings.plan(normalizer=None, federation_pos_weight=2.5)
    assert (plan.batch_size, plan.clip_grad_norm, plan.local_norms, plan.planned_rounds) == (8, 0.5, True, 4)
    assert (plan.optimizer, plan.momentum) == ("sgd", 0.5)
    assert plan.model.n_heads == 2 and plan.learning_rate == settings.learning_rate
    assert plan.pos_weight == 2.5
    # Each site its own weight: asked for, or when a member did not report its training positives.
    assert ServerSettings(class_weight="site").plan(None, 2.5).pos_weight == 0.0
    assert ServerSettings(class_weight="none").plan(None, 2.5).pos_weight == 1.0  # unweighted at every site
    assert settings.plan(None, None).pos_weight == 0.0
