"""hymate-server's --site-keys: a site's name is its identity, so no name or key may appear twice."""

from __future__ import annotations

import pytest

from server.cli import main, site_public_keys
from server.settings import SettingsError

KEY_A = "ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQAAAAIbmlzdHAzODQAAABhBAAA"
KEY_B = "ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQAAAAIbmlzdHAzODQAAABhBBBB"


def pub(path, key: str, comment: str = "someone@somewhere"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{key} {comment}\n")
    return path


def test_keys_are_registered_under_their_file_stems(tmp_path):
    a = pub(tmp_path / "sites" / "hospital-1.pub", KEY_A)
    b = pub(tmp_path / "more" / "hospital-2.pub", KEY_B)
    assert site_public_keys([tmp_path / "sites", b]) == {"hospital-1": a, "hospital-2": b}


def test_two_key_files_for_one_site_name_are_refused(tmp_path):
    a = pub(tmp_path / "sites" / "hospital-1.pub", KEY_A)
    b = pub(tmp_path / "late" / "hospital-1.pub", KEY_B)
    with pytest.raises(SettingsError) as e:
        site_public_keys([tmp_path / "sites", tmp_path / "late"])
    assert str(e.value) == f"--site-keys: two keys for site hospital-1: {a} and {b}"


def test_one_key_under_two_names_is_refused_whatever_its_comment(tmp_path):
    a = pub(tmp_path / "sites" / "hospital-1.pub", KEY_A, "first")
    b = pub(tmp_path / "sites" / "hospital-9.pub", KEY_A, "second")
    with pytest.raises(SettingsError) as e:
        site_public_keys([tmp_path / "sites"])
    assert str(e.value) == f"--site-keys {b}: the same public key is already registered as hospital-1 ({a})"


def test_hymate_server_refuses_them_before_starting_anything(tmp_path, capsys):
    for name in ("ca.crt", "server.crt", "server.key"):
        (tmp_path / name).write_text("x")
    pub(tmp_path / "a" / "hospital-1.pub", KEY_A)
    pub(tmp_path / "b" / "hospital-1.pub", KEY_B)
    argv = ["--run-dir", str(tmp_path / "run"), "--site-keys", str(tmp_path / "a"), "--site-keys", str(tmp_path / "b")]
    argv += ["--ssl-ca-certfile", str(tmp_path / "ca.crt"), "--ssl-certfile", str(tmp_path / "server.crt")]
    argv += ["--ssl-keyfile", str(tmp_path / "server.key")]
    assert main(argv) == 2
    assert "two keys for site hospital-1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
