"""A site makes its own key pair; the coordinator makes only the CA and its own certificate."""

import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client import cli
from client.site_keys import SiteKeyError, check_root_certificate, check_site_key, write_site_key_pair
from server import cli as server_cli


def test_init_key_writes_a_private_openssh_p384_key_and_its_pub(tmp_path, capsys):
    assert cli.main(["init-key", str(tmp_path / "k"), "--name", "hospital-1"]) == 0
    private, public = tmp_path / "k" / "hospital-1", tmp_path / "k" / "hospital-1.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ") and public.read_text().endswith(" hospital-1\n")
    out = capsys.readouterr().out
    assert str(public) in out and "Give only" in out and "to the coordinator" in out
    assert check_site_key(private).public_key().public_numbers() == key.public_key().public_numbers()


def test_init_key_never_overwrites_a_key(tmp_path, capsys):
    assert cli.main(["init-key", str(tmp_path)]) == 0  # default name "site"
    before = (tmp_path / "site").read_bytes()
    assert cli.main(["init-key", str(tmp_path)]) == 2
    assert "already exists; refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "site").read_bytes() == before


def test_init_certs_writes_no_site_keys_unless_asked_for_a_pilot(tmp_path, capsys):
    assert server_cli.main(["init-certs", str(tmp_path / "a"), "--host", "127.0.0.1"]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["ca.crt", "ca.key", "server.crt", "server.key"]
    assert "PILOT" not in capsys.readouterr().out
    assert server_cli.main(["init-certs", str(tmp_path / "b"), "--host", "127.0.0.1", "--pilot-site-keys", "2"]) == 0
    out = capsys.readouterr().out
    assert "PILOT ONLY" in out and "never use them with patient data" in out
    sites = tmp_path / "b" / "sites"
    assert sorted(p.name for p in sites.iterdir()) == ["site-1", "site-1.pub", "site-2", "site-2.pub"]
    check_site_key(sites / "site-1")  # the same key format as `hymate-client init-key`
    with pytest.raises(SystemExit):
        server_cli.main(["init-certs", "--help"])
    assert "PILOT ONLY" in capsys.readouterr().out


def test_init_certs_never_overwrites_a_federations_ca(tmp_path, capsys):
    assert server_cli.main(["init-certs", str(tmp_path), "--host", "127.0.0.1"]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert server_cli.main(["init-certs", str(tmp_path), "--host", "127.0.0.1", "--pilot-site-keys", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'ca.key'}" in err and "refusing to overwrite the federation's keys" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no pilot key either


def test_a_missing_unsafe_malformed_or_mismatched_key_is_refused_by_name(tmp_path):
    with pytest.raises(SiteKeyError, match="nowhere: no such file .*hymate-client init-key"):
        check_site_key(tmp_path / "nowhere")
    key = write_site_key_pair(tmp_path / "a", "hospital-1")
    os.chmod(key, 0o644)
    with pytest.raises(SiteKeyError, match="readable by others \\(mode 0644\\); run `chmod 600"):
        check_site_key(key)
    os.chmod(key, 0o600)
    bad = tmp_path / "bad"
    bad.write_text("not a key\n")
    os.chmod(bad, 0o600)
    with pytest.raises(SiteKeyError, match="bad: not an unencrypted OpenSSH private key"):
        check_site_key(bad)
    other = write_site_key_pair(tmp_path / "b", "hospital-1")
    (tmp_path / "a" / "hospital-1.pub").write_bytes((other.with_name("hospital-1.pub")).read_bytes())
    with pytest.raises(SiteKeyError, match="does not match .*hospital-1.pub"):
        check_site_key(key)


def test_the_root_certificate_must_be_a_pem_certificate(tmp_path):
    with pytest.raises(SiteKeyError, match="--root-cert .*ca.crt: no such file"):
        check_root_certificate(tmp_path / "ca.crt")
    (tmp_path / "ca.crt").write_text("-----BEGIN NOTHING-----\n")
    with pytest.raises(SiteKeyError, match="not a PEM certificate"):
        check_root_certificate(tmp_path / "ca.crt")


def test_hymate_client_checks_its_key_before_it_loads_data_or_connects(tmp_path, capsys):
    server_cli.main(["init-certs", str(tmp_path / "keys"), "--host", "127.0.0.1"])
    args = ["--server", "127.0.0.1:1", "--dataset", "synthetic", "--state-dir", str(tmp_path / "state")]
    tls = ["--root-cert", str(tmp_path / "keys" / "ca.crt"), "--auth-key", str(tmp_path / "missing-key")]
    assert cli.main(args + tls) == 2
    assert "--auth-key" in capsys.readouterr().err and not (tmp_path / "state").exists()
    assert cli.main(args + ["--insecure", "--auth-key", str(tmp_path / "k")]) == 2
    assert "--insecure and --auth-key contradict" in capsys.readouterr().err
