"""The coordinator's certificates, without an OpenSSL manual.

``hymate-server init-certs DIR --host coordinator.example.org`` writes:

```
DIR/ca.crt, ca.key                  a private certificate authority (keep ca.key offline)
DIR/server.crt, server.key          the coordinator's TLS certificate, for the given hosts
```

Each hospital gets ``ca.crt`` to verify the coordinator, generates its own SuperNode key pair
(``hymate-client init-key``) and sends back only the ``.pub``, which the coordinator registers.
The coordinator never holds a hospital's private key.

PILOT ONLY: ``--pilot-site-keys N`` also writes ``DIR/sites/site-1 .. site-N`` (and ``.pub``),
so one person can try a federation on one machine. Those private keys were made by the
coordinator, so they must never be used with patient data.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from client.site_keys import write_site_key_pair


@dataclass(frozen=True)
class FederationKeys:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    site_keys: dict[str, Path]  # PILOT ONLY: site name -> private key; the public key is "<path>.pub"


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "HyMaTE-FL"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _subject_alternative_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def create_federation_keys(
    directory: Path, pilot_sites: Sequence[str] = (), hosts: list[str] | None = None, days: int = 365
) -> FederationKeys:
    """A CA and a server certificate valid for ``hosts``; PILOT ONLY: a key pair per ``pilot_sites`` name.

    Refuses (FileExistsError, before writing anything) when any of the files is already there:
    a new CA would silently invalidate every certificate the federation has handed out.
    """
    directory = Path(directory)
    targets = [directory / n for n in ("ca.key", "ca.crt", "server.key", "server.crt")]
    targets += [directory / "sites" / f"{site}{suffix}" for site in pilot_sites for suffix in ("", ".pub")]
    existing = [str(p) for p in targets if p.exists()]
    if existing:
        raise FileExistsError(
            f"{', '.join(existing)} already exist(s); refusing to overwrite the federation's keys (move them away first)"
        )
    # The coordinator's own tools talk to its SuperLink over loopback, so those names are always in.
    hosts = list(dict.fromkeys([*(hosts or []), "127.0.0.1", "localhost"]))
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("HyMaTE-FL federation CA"))
        .issuer_name(_name("HyMaTE-FL federation CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(_subject_alternative_names(hosts)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    _write(directory / "ca.key", _key_pem(ca_key), private=True)
    _write(directory / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(directory / "server.key", _key_pem(server_key), private=True)
    _write(directory / "server.crt", server_cert.public_bytes(serialization.Encoding.PEM))

    site_keys = {site: write_site_key_pair(directory / "sites", site) for site in pilot_sites}
    return FederationKeys(directory / "ca.crt", directory / "server.crt", directory / "server.key", site_keys)
