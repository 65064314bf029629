"""A site's options: 0 is a value, and a site configured for DP never trains without it."""

import subprocess
import sys
from pathlib import Path

import pytest

from client import cli
from client.site import DPSettings, SiteConfigError, SiteSettings

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
        ("--dp-epsilon", "0", "--dp-epsilon 0.0: must be a finite number > 0"),
        ("--dp-epsilon", "-1", "--dp-epsilon -1.0: must be a finite number > 0"),
        ("--dp-epsilon", "nan", "--dp-epsilon nan: must be a finite number > 0"),
        ("--dp-delta", "0", "--dp-delta 0.0: must be in \\(0, 1\\)"),
        ("--dp-delta", "1", "--dp-delta 1.0: must be in \\(0, 1\\)"),
        ("--dp-max-grad-norm", "0", "--dp-max-grad-norm 0.0: must be a finite number > 0"),
        ("--dp-planned-rounds", "0", "--dp-planned-rounds 0: must be at least 1"),
        ("--dp-clip-quantile", "1", "--dp-clip-quantile 1.0: must be in \\(0, 1\\)"),
        ("--dp-clip-learning-rate", "-0.2", "--dp-clip-learning-rate -0.2: must be a finite number > 0"),
        ("--max-restarts", "-1", "--max-restarts -1: must be 0 or more"),
    ],
)
def test_bad_values_are_start_up_errors_naming_the_flag(flag, value, message):
    with pytest.raises(SiteConfigError, match=message):
        options(flag, value)


def test_a_bad_value_from_the_config_file_names_the_file_and_its_key(tmp_path):
    path = config_file(tmp_path, "dp-epsilon = 0\n")
    with pytest.raises(SiteConfigError, match=f"--dp-epsilon 0.0: .* \\(from --config {path}, key 'dp-epsilon'\\)"):
        options("--config", str(path))
    path = config_file(tmp_path, 'dp-max-grad-norm = "big"\n')
    with pytest.raises(SiteConfigError, match="dp-max-grad-norm = 'big' must be a float \\(--dp-max-grad-norm\\)"):
        options("--config", str(path))
    path = config_file(tmp_path, "dp-epsilon = true\n")
    with pytest.raises(SiteConfigError, match="epsilon = True must be a float"):
        options("--config", str(path))
    path = config_file(tmp_path, 'dp-accountant = "gdp"\n')
    with pytest.raises(SiteConfigError, match="must be one of rdp, prv"):
        options("--config", str(path))


def test_config_file_values_merge_with_flags_zero_and_false_included(tmp_path):
    path = config_file(tmp_path, "insecure = true\nmax-restarts = 0\ndp-epsilon = 8\nverbose = false\n")
    merged = options("--config", str(path))
    assert merged["insecure"] is True and merged["max_restarts"] == 0 and merged["dp_epsilon"] == 8.0
    assert merged["verbose"] is False
    # A flag wins over the file, and a store_true flag not given leaves the file's value alone.
    merged = options("--config", str(path), "--max-restarts", "3", "--dp-epsilon", "2")
    assert merged["max_restarts"] == 3 and merged["dp_epsilon"] == 2.0 and merged["insecure"] is True
    path = config_file(tmp_path, "insecure = 1\n")
    with pytest.raises(SiteConfigError, match="insecure = 1 must be true or false"):
        options("--config", str(path))


def test_the_dp_settings_reach_the_node_config_and_come_back_as_dp(tmp_path):
    path = config_file(tmp_path, f'dataset = "synthetic"\nstate-dir = "{tmp_path}"\ndp-epsilon = 8\ndp-delta = 1e-6\n')
    node_config = cli.site_config(options("--config", str(path)))
    assert node_config["dp-epsilon"] == "8.0" and node_config["dp-delta"] == "1e-06"
    dp = SiteSettings.from_node_config(node_config).privacy(planned_rounds=10)
    assert dp is not None and dp.target_epsilon == 8.0 and dp.delta == 1e-6 and dp.planned_rounds == 10


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("dp-epsilon", "", "'dp-epsilon'='' is not a valid float"),
        ("dp-epsilon", "  ", "is not a valid float"),
        ("dp-epsilon", "8x", "'dp-epsilon'='8x' is not a valid float"),
        ("dp-epsilon", True, "is not a valid float"),
        ("dp-epsilon", "0", "dp-epsilon=0.0 must be a finite number > 0"),
        ("dp-epsilon", "inf", "dp-epsilon=inf must be a finite number > 0"),
        ("dp-delta", "1.5", "dp-delta=1.5 must be in \\(0, 1\\)"),
        ("dp-max-grad-norm", "-1", "dp-max-grad-norm=-1.0 must be a finite number > 0"),
        ("dp-planned-rounds", "0", "dp-planned-rounds=0 must be at least 1"),
        ("dp-planned-rounds", 2.5, "is not a valid int"),
        ("dp-accountant", "gdp", "dp-accountant='gdp' must be one of rdp, prv"),
        ("dp-clip-quantile", "0", "dp-clip-quantile=0.0 must be in \\(0, 1\\)"),
        ("dp-clip-quantile", "half", "'dp-clip-quantile'='half' is not a valid float"),
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
    settings = SiteSettings.from_node_config({"dataset": "synthetic", "state-dir": str(tmp_path), "dp-epsilon": 0.5})
    assert settings.privacy(planned_rounds=3).target_epsilon == 0.5
    with pytest.raises(SiteConfigError, match="epsilon=0.0"):
        DPSettings(epsilon=0.0)


def test_hymate_client_with_epsilon_0_in_its_config_file_stops_with_exit_code_2(tmp_path):
    path = config_file(
        tmp_path,
        f'server = "127.0.0.1:1"\ndataset = "synthetic"\nstate-dir = "{tmp_path / "state"}"\n'
        "insecure = true\ndp-epsilon = 0\n",
    )
    done = subprocess.run(
        [BIN / "hymate-client", "--config", path], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2
    assert (
        f"hymate-client: error: --dp-epsilon 0.0: must be a finite number > 0 (from --config {path}, key 'dp-epsilon')"
        in (done.stderr)
    )
    assert not (tmp_path / "state").exists()  # stopped before anything was written or started
