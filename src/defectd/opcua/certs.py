"""Certificates and users of the OPC UA server.

- ``make_certificate``: a self-signed application certificate and its RSA key as OPC UA
  (Part 6, 6.2.2) wants them: the application URI in subjectAltName, key usage for signing and
  encryption, extended key usage server and/or client auth. ``defectd opcua cert`` writes the
  server's (certificate DER, key PEM readable by its owner only) and, for trials, clients'.
- ``TrustedClients``: the client certificates let in, read from a folder (exact match of the
  DER bytes: the certificate pinning PLC engineering tools do when a certificate is "trusted").
- ``UsersFile``: ``name:scrypt$N$r$p$salt$hash`` lines (``hash_password``); passwords are
  never stored in clear and compared in constant time.

Only ``cryptography`` is needed here (no asyncua); it comes with the ``defectd[opcua]`` extra.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from defectd.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


@dataclass(frozen=True, slots=True)
class CertificatePair:
    certificate: Path  # DER
    private_key: Path  # PEM, PKCS#8, mode 0600


def make_certificate(
    certificate: Path,
    private_key: Path,
    *,
    application_uri: str,
    common_name: str,
    hosts: tuple[str, ...] = ("localhost",),
    role: Literal["server", "client"] = "server",
    days: int = 3650,
    key_bits: int = 2048,
    overwrite: bool = False,
) -> CertificatePair:
    """Write a self-signed certificate (DER) and its key (PEM) for an OPC UA application.

    ``hosts`` are DNS names or IP addresses the endpoint is reached by. Raises
    ``ConfigError`` when a file exists and ``overwrite`` is off, or cannot be written.
    """
    for path in (certificate, private_key):
        if path.exists() and not overwrite:
            raise ConfigError(f"{path}: exists; pass --force to replace it")
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_bits)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "defectd"),
        ]
    )
    alt: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri)]
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    if role == "client":
        usage = [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    try:
        certificate.parent.mkdir(parents=True, exist_ok=True)
        private_key.parent.mkdir(parents=True, exist_ok=True)
        certificate.write_bytes(cert.public_bytes(serialization.Encoding.DER))
        fd = os.open(private_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
    except OSError as exc:
        raise ConfigError(f"cannot write the certificate pair: {exc}") from None
    return CertificatePair(certificate, private_key)


def certificate_uris(path: Path) -> list[str]:
    """The URIs in a certificate's subjectAltName (DER or PEM). Raises ``ConfigError``."""
    cert = _load_certificate(path, "opcua.certificate")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(san.value.get_values_for_type(x509.UniformResourceIdentifier))


def _load_certificate(path: Path, key: str) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise ConfigError(f"{key}: {path} is not an X.509 certificate: {exc}") from None


class TrustedClients:
    """The client certificates let in: every ``*.der``, ``*.pem``, ``*.crt`` in a folder.

    ``is_trusted(der)`` compares the client's certificate byte for byte (DER). The folder is
    read at start; add a client and restart (or reload) the daemon.
    """

    def __init__(self, folder: Path) -> None:
        """Raises ``ConfigError`` naming ``opcua.trusted_clients`` when the folder is missing
        or holds a file that is not a certificate."""
        if not folder.is_dir():
            raise ConfigError(f"opcua.trusted_clients: {folder} is not a folder")
        self.folder = folder
        self._ders: dict[bytes, str] = {}
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in (".der", ".pem", ".crt"):
                continue
            cert = _load_certificate(path, "opcua.trusted_clients")
            self._ders[cert.public_bytes(serialization.Encoding.DER)] = path.name

    def __len__(self) -> int:
        return len(self._ders)

    def name_of(self, der: bytes) -> str | None:
        """The file name of a trusted certificate, or ``None`` when it is not trusted."""
        return self._ders.get(bytes(der))


# --- users ----------------------------------------------------------------------------------


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$salt$hash`` (base64) of ``password``."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32
    )
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def _check_hash(stored: str, password: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        want = base64.b64decode(digest)
        got = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(want),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


class UsersFile:
    """User names and password hashes, one ``name:hash`` per line (``#`` comments).

    Written by ``defectd opcua user``; the daemon reads it at start. ``check`` is constant
    time in the password and false for an unknown user (after the same work).
    """

    def __init__(self, path: Path) -> None:
        """Raises ``ConfigError`` naming ``opcua.users_file`` and the line at fault."""
        self.path = path
        self._users: dict[str, str] = {}
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"opcua.users_file: cannot read {path}: {exc.strerror}") from None
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, stored = line.partition(":")
            if not sep or not _NAME.match(name) or not stored.startswith("scrypt$"):
                raise ConfigError(
                    f"opcua.users_file: {path} line {n}: expected NAME:scrypt$... (write users "
                    "with defectd opcua user NAME; passwords are never stored in clear)"
                )
            self._users[name] = stored
        if not self._users:
            raise ConfigError(f"opcua.users_file: {path} has no user")
        self._dummy = hash_password("", salt=b"\0" * 16)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._users)

    def check(self, name: str | None, password: str | None) -> bool:
        stored = self._users.get(name or "")
        ok = _check_hash(stored or self._dummy, password or "")
        return ok and stored is not None


def add_user(path: Path, name: str, password: str) -> None:
    """Add or replace ``name`` in the users file at ``path`` (created 0600). Raises
    ``ConfigError`` for a bad name or an empty password."""
    if not _NAME.match(name):
        raise ConfigError(f"user name {name!r}: 1-64 of A-Z a-z 0-9 _ . @ -")
    if not password:
        raise ConfigError("the password is empty")
    lines: list[str] = []
    if path.exists():
        lines = [
            line
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.partition(":")[0].strip() != name
        ]
    lines.append(f"{name}:{hash_password(password)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
