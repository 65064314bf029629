"""A site's options: 0 is a value, and a site configured for DP never trains without it."""

import subprocess
import sys
from pathlib import Path

import pytest

from client import cli
from client.site import SiteConfigError, SiteSettings

BIN = Path(sys.executable).parent


def options(*argv: str) -> dict:
    return cli.merged_options(cli.build_parser().parse_args(list(argv)))


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


def test_zero_is_kept_and_the_restarts_are_bounded_by_default():
    assert options("--max-restarts", "0")["max_restarts"] == 0
    assert options()["max_restarts"] == cli.DEFAULT_MAX_RESTARTS == 5
    assert options("--insecure")["insecure"] is True and "insecure" not in options()


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--epsilon", "0", "--epsilon 0.0: must be a finite number > 0"),
        ("--epsilon", "-1", "--epsilon -1.0: must be a finite number > 0"),
        ("--epsilon", "nan", "--epsilon nan: must be a finite number > 0"),
        ("--delta", "0", "--delta 0.0: must be in \\(0, 1\\)"),
        ("--delta", "1", "--delta 1.0: must be in \\(0, 1\\)"),
        ("--max-grad-norm", "0", "--max-grad-norm 0.0: must be a finite number > 0"),
        ("--dp-planned-rounds", "0", "--dp-planned-rounds 0: must be at least 1"),
        ("--max-restarts", "-1", "--max-restarts -1: must be 0 or more"),
    ],
)
def test_bad_values_are_start_up_errors_naming_the_flag(flag, value, message):
    with pytest.raises(SiteConfigError, match=message):
        options(flag, value)


def test_a_bad_value_from_the_config_file_names_the_file_and_its_key(tmp_path):
    path = config_file(tmp_path, "epsilon = 0\n")
    with pytest.raises(SiteConfigError, match=f"--epsilon 0.0: .* \\(from --config {path}, key 'epsilon'\\)"):
        options("--config", str(path))
    path = config_file(tmp_path, 'max-grad-norm = "big"\n')
    with pytest.raises(SiteConfigError, match="max-grad-norm = 'big' must be a float \\(--max-grad-norm\\)"):
        options("--config", str(path))
    path = config_file(tmp_path, "epsilon = true\n")
    with pytest.raises(SiteConfigError, match="epsilon = True must be a float"):
        options("--config", str(path))
    path = config_file(tmp_path, 'dp-accountant = "gdp"\n')
    with pytest.raises(SiteConfigError, match="must be one of rdp, prv"):
        options("--config", str(path))


def test_config_file_values_merge_with_flags_zero_and_false_included(tmp_path):
    path = config_file(tmp_path, "insecure = true\nmax-restarts = 0\nepsilon = 8\nverbose = false\n")
    merged = options("--config", str(path))
    assert merged["insecure"] is True and merged["max_restarts"] == 0 and merged["epsilon"] == 8.0
    assert merged["verbose"] is False
    # A flag wins over the file, and a store_true flag not given leaves the file's value alone.
    merged = options("--config", str(path), "--max-restarts", "3", "--epsilon", "2")
    assert merged["max_restarts"] == 3 and merged["epsilon"] == 2.0 and merged["insecure"] is True
    path = config_file(tmp_path, "insecure = 1\n")
    with pytest.raises(SiteConfigError, match="insecure = 1 must be true or false"):
        options("--config", str(path))


def test_the_dp_settings_reach_the_node_config_and_come_back_as_dp(tmp_path):
    path = config_file(tmp_path, f'dataset = "synthetic"\nstate-dir = "{tmp_path}"\nepsilon = 8\ndelta = 1e-6\n')
    node_config = cli.site_config(options("--config", str(path)))
    assert node_config["epsilon"] == "8.0" and node_config["delta"] == "1e-06"
    dp = SiteSettings.from_node_config(node_config).privacy(planned_rounds=10)
    assert dp is not None and dp.target_epsilon == 8.0 and dp.delta == 1e-6 and dp.planned_rounds == 10


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("epsilon", "", "'epsilon'='' is not a valid float"),
        ("epsilon", "  ", "is not a valid float"),
        ("epsilon", "8x", "'epsilon'='8x' is not a valid float"),
        ("epsilon", True, "is not a valid float"),
        ("epsilon", "0", "epsilon=0.0 must be a finite number > 0"),
        ("epsilon", "inf", "epsilon=inf must be a finite number > 0"),
        ("delta", "1.5", "delta=1.5 must be in \\(0, 1\\)"),
        ("max-grad-norm", "-1", "max-grad-norm=-1.0 must be a finite number > 0"),
        ("dp-planned-rounds", "0", "dp-planned-rounds=0 must be at least 1"),
        ("dp-planned-rounds", 2.5, "is not a valid int"),
        ("dp-accountant", "gdp", "dp-accountant='gdp' must be one of rdp, prv"),
        ("epsilom", "8", "unknown keys \\['epsilom'\\]"),
    ],
)
def test_a_node_config_never_turns_dp_off_silently(tmp_path, key, value, message):
    config = {"dataset": "synthetic", "state-dir": str(tmp_path), key: value}
    with pytest.raises(SiteConfigError, match=message):
        SiteSettings.from_node_config(config)


def test_only_a_site_without_epsilon_trains_without_dp(tmp_path):
    settings = SiteSettings.from_node_config({"dataset": "synthetic", "state-dir": str(tmp_path)})
    assert settings.privacy(planned_rounds=3) is None
    settings = SiteSettings.from_node_config({"dataset": "synthetic", "state-dir": str(tmp_path), "epsilon": 0.5})
    assert settings.privacy(planned_rounds=3).target_epsilon == 0.5
    with pytest.raises(SiteConfigError, match="epsilon=0.0"):
        SiteSettings(dataset="synthetic", state_dir=tmp_path, epsilon=0.0)


def test_hymate_client_with_epsilon_0_in_its_config_file_stops_with_exit_code_2(tmp_path):
    path = config_file(
        tmp_path,
        f'server = "127.0.0.1:1"\ndataset = "synthetic"\nstate-dir = "{tmp_path / "state"}"\n'
        "insecure = true\nepsilon = 0\n",
    )
    done = subprocess.run(
        [BIN / "hymate-client", "--config", path], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2
    assert (
        f"hymate-client: error: --epsilon 0.0: must be a finite number > 0 (from --config {path}, key 'epsilon')"
        in (done.stderr)
    )
    assert not (tmp_path / "state").exists()  # stopped before anything was written or started
