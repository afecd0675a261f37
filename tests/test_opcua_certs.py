"""``defectd opcua cert`` and ``defectd opcua user``: the server's certificate and its users."""

from __future__ import annotations

import io
import stat
from pathlib import Path

import pytest
from cryptography import x509

from defectd.cli import main
from defectd.errors import ConfigError
from defectd.opcua.certs import TrustedClients, UsersFile, add_user, certificate_uris


def test_cert_writes_a_server_certificate_naming_the_application_uri(tmp_path: Path) -> None:
    cert, key = tmp_path / "pki" / "server.der", tmp_path / "pki" / "server.key.pem"
    args = [
        "opcua",
        "cert",
        "--cert",
        str(cert),
        "--key",
        str(key),
        "--uri",
        "urn:defectd:l1:server",
    ]
    assert main([*args, "--host", "cell-3", "--host", "10.0.3.15"]) == 0
    parsed = x509.load_der_x509_certificate(cert.read_bytes())
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["cell-3"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.3.15"]
    assert certificate_uris(cert) == ["urn:defectd:l1:server"]
    usage = parsed.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and usage.data_encipherment
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert main(args) == 2  # an existing pair is never overwritten without --force


def test_users_are_stored_hashed_and_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = tmp_path / "users"
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    assert main(["opcua", "user", "plc", "--users-file", str(users), "--password-stdin"]) == 0
    add_user(users, "scada", "other")
    text = users.read_text()
    assert "s3cret" not in text and text.count("scrypt$") == 2
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    check = UsersFile(users)
    assert check.check("plc", "s3cret")
    assert not check.check("plc", "S3cret")
    assert not check.check("nobody", "s3cret")
    assert not check.check(None, None)


def test_a_clear_text_password_in_the_users_file_is_refused(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("# line PLC\nplc:secret\n")
    with pytest.raises(ConfigError, match=r"opcua.users_file: .* line 2: expected NAME:scrypt"):
        UsersFile(users)


def test_the_trust_folder_must_hold_only_certificates(tmp_path: Path) -> None:
    trusted = tmp_path / "trusted"
    with pytest.raises(ConfigError, match=r"opcua.trusted_clients: .* is not a folder"):
        TrustedClients(trusted)
    trusted.mkdir()
    (trusted / "plc.der").write_bytes(b"not a certificate")
    with pytest.raises(ConfigError, match=r"opcua.trusted_clients: .*plc.der is not an X.509"):
        TrustedClients(trusted)
