"""A site's SuperNode key pair: written by the hospital, checked before the site connects.

A hospital generates its own key pair on its own machine (``hymate-client init-key``) and hands
only the ``.pub`` file to the coordinator, which registers it under the site's name. The private
key never leaves the hospital. The format is what ``flower-supernode
--auth-supernode-private-key`` takes: ECDSA P-384 in OpenSSH format, no passphrase (the
SuperNode reads it unattended), mode 0600.

This module imports nothing of the client or the server, so ``hymate-server init-certs
--pilot-site-keys`` writes its pilot keys with the same function (the one place where the
coordinator's code imports the client's, and the harmless direction: a hospital still runs
none of the coordinator's code).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


class SiteKeyError(ValueError):
    """A site key file is missing, unreadable, malformed or unsafe; names the file."""


def write_site_key_pair(directory: Path, name: str = "site") -> Path:
    """Write ``directory/name`` (private, 0600) and ``directory/name.pub``; return the private key's path.

    Refuses to overwrite either file: replacing a registered key silently would lock the site out
    of its federation (and losing the old private key cannot be undone).
    """
    if not name or "/" in name or name.startswith("."):
        raise SiteKeyError(f"--name {name!r}: a key name is a plain file name (letters, digits, '-', '_')")
    directory = Path(directory)
    private, public = directory / name, directory / f"{name}.pub"
    for path in (private, public):
        if path.exists():
            raise SiteKeyError(f"{path} already exists; refusing to overwrite a site key (move it away first)")
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    # Created with mode 0600 from the start, so the key is never readable by others, not even briefly.
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_bytes)
    os.chmod(private, 0o600)  # in case a umask or filesystem widened it
    public_bytes = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public.write_bytes(public_bytes + f" {name}\n".encode())
    return private


def check_site_key(path: Path, flag: str = "--auth-key") -> ec.EllipticCurvePrivateKey:
    """Fail now, naming the file, if the SuperNode could not use this key or it is unsafe.

    Refuses (does not merely warn about) a key that others can read: a readable private key means
    anyone on the machine can connect as this hospital, and the fix (``chmod 600``) is one command.
    A ``.pub`` next to it must be its public half, so the site does not run with a key the
    coordinator never registered while the file it handed over says otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise SiteKeyError(f"{flag} {path}: no such file (create one with `hymate-client init-key DIR`)")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SiteKeyError(
            f"{flag} {path}: the private key is readable by others (mode {mode:04o}); run `chmod 600 {path}`"
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SiteKeyError(f"{flag} {path}: cannot be read ({e.strerror})") from None
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise SiteKeyError(f"{flag} {path}: not an unencrypted OpenSSH private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SiteKeyError(f"{flag} {path}: a {type(key).__name__}; the SuperNode needs an ECDSA key")
    public = path.with_name(path.name + ".pub")
    if public.is_file():
        try:
            registered = serialization.load_ssh_public_key(_key_part(public))
        except (ValueError, TypeError, IndexError) as e:
            raise SiteKeyError(f"{public}: not an OpenSSH public key ({e})") from None
        if registered.public_numbers() != key.public_key().public_numbers():
            raise SiteKeyError(f"{flag} {path}: does not match {public} (the public key handed to the coordinator)")
    return key


def _key_part(public: Path) -> bytes:
    """``ecdsa-sha2-nistp384 AAAA...`` without the trailing comment."""
    return b" ".join(public.read_bytes().split()[:2])


def check_root_certificate(path: Path, flag: str = "--root-cert") -> None:
    """Fail now, naming the file, unless ``path`` holds a PEM certificate."""
    path = Path(path)
    if not path.is_file():
        raise SiteKeyError(f"{flag} {path}: no such file (the coordinator's ca.crt)")
    try:
        x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as e:
        raise SiteKeyError(f"{flag} {path}: cannot be read ({e.strerror})") from None
    except ValueError:
        raise SiteKeyError(f"{flag} {path}: not a PEM certificate (expected the coordinator's ca.crt)") from None
