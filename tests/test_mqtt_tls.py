"""TLS and passwords on loopback: certificates made by the test, a password-protected broker."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog

from defectd.log import configure_logging
from defectd.pipeline.inspection import Inspection, Verdict
from defectd.publish import MqttConfig, OutboxConfig, Publisher, TlsConfig
from defectd.testing.mosquitto import Mosquitto

cryptography = pytest.importorskip("cryptography")
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

USER = "line7"
PASSWORD = "s3cr3t-Pa55w0rd-line7"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    dns: tuple[str, ...] = (),
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if dns:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ca.crt``, ``server.crt/key`` (valid for the name localhost only), ``client.crt/key``."""
    d = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    _write(d / "ca", ca_key, _cert("defectd test CA", ca_key, "defectd test CA", ca_key, ca=True))
    server_key = _key()
    server = _cert("localhost", server_key, "defectd test CA", ca_key, dns=("localhost",))
    _write(d / "server", server_key, server)
    client_key = _key()
    _write(d / "client", client_key, _cert("st1", client_key, "defectd test CA", ca_key))
    return d


def write_password_file(path: Path, user: str, password: str) -> None:
    """A Mosquitto password file: ``mosquitto_passwd`` when installed, else the ``$7$`` format
    (PBKDF2-SHA512, 101 iterations) written directly."""
    tool = shutil.which("mosquitto_passwd")
    if tool:
        path.touch()
        subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True)
        return
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    b64 = base64.b64encode
    path.write_text(f"{user}:$7$101${b64(salt).decode()}${b64(digest).decode()}\n")


@pytest.fixture
def tls_broker(mosquitto: Callable[..., Mosquitto], pki: Path, tmp_path: Path) -> Mosquitto:
    passwords = tmp_path / "passwd"
    write_password_file(passwords, USER, PASSWORD)
    listener = "\n".join(
        [
            f"cafile {pki / 'ca.crt'}",
            f"certfile {pki / 'server.crt'}",
            f"keyfile {pki / 'server.key'}",
            "require_certificate true",
        ]
    )
    return mosquitto(
        allow_anonymous=False, listener_conf=listener, extra_conf=f"password_file {passwords}"
    )


def tls_config(broker: Mosquitto, pki: Path, host: str = "localhost", **kw: object) -> MqttConfig:
    tls = TlsConfig(
        ca_file=pki / "ca.crt", cert_file=pki / "client.crt", key_file=pki / "client.key"
    )
    return MqttConfig(
        host=host, port=broker.port, tls=tls, username=USER, reconnect_min_s=0.1,
        reconnect_max_s=0.3, topic_prefix="tls", **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def run_publisher(
    config: MqttConfig, tmp_path: Path, until: Callable[[Publisher], bool]
) -> Publisher:
    pub = Publisher(config, OutboxConfig(path=tmp_path / "outbox.sqlite"), "st1")
    pub.start()
    try:
        pub.submit(Inspection("st1", "cam0", 1, Verdict.FAIL, rule="r", t_grab_wall=time.time()))
        deadline = time.monotonic() + 10
        while not until(pub) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        pub.stop(drain_timeout_s=0.5)
    return pub


def test_tls_with_a_client_certificate_and_a_password_file_delivers(
    tls_broker: Mosquitto, pki: Path, tmp_path: Path
) -> None:
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    config = tls_config(tls_broker, pki, password_file=tmp_path / "pw")
    pub = run_publisher(config, tmp_path, lambda p: p.stats().outbox_depth == 0)
    stats = pub.stats()
    assert (stats.outbox_depth, stats.acked, stats.connects) == (0, 2, 1)


def test_a_wrong_password_is_a_clear_error_naming_the_reason_code(
    tls_broker: Mosquitto, pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEFECTD_TEST_MQTT_PW", "not-the-password")
    config = tls_config(tls_broker, pki, password_env="DEFECTD_TEST_MQTT_PW")
    with structlog.testing.capture_logs() as logs:
        pub = run_publisher(config, tmp_path, lambda p: p.stats().connect_failures >= 2)
    refusals = [e for e in logs if e["event"] == "broker_refused"]
    assert refusals
    assert refusals[0]["log_level"] == "error"
    # Mosquitto answers a wrong password with "Not authorized" (MQTT 5 reason code 135)
    assert "refused the connection: Not authorized (135)" in refusals[0]["reason"]
    assert f"user {USER!r}" in refusals[0]["reason"]
    assert pub.stats().connects == 0
    # nothing lost: the result, its reject and the broker_refused event wait in the outbox
    assert pub.stats().outbox_depth == 3


def test_a_certificate_for_another_host_name_is_rejected(
    tls_broker: Mosquitto, pki: Path, tmp_path: Path
) -> None:
    (tmp_path / "pw").write_text(PASSWORD)
    config = tls_config(tls_broker, pki, host="127.0.0.1", password_file=tmp_path / "pw")
    pub = run_publisher(config, tmp_path, lambda p: p.stats().connect_failures >= 1)
    assert "TLS certificate rejected" in (pub.stats().last_error or "")
    assert pub.stats().connects == 0


def test_host_checking_off_delivers_to_an_address_and_warns_once(
    tls_broker: Mosquitto, pki: Path, tmp_path: Path
) -> None:
    (tmp_path / "pw").write_text(PASSWORD)
    config = tls_config(tls_broker, pki, host="127.0.0.1", password_file=tmp_path / "pw")
    tls = config.tls.model_copy(update={"check_hostname": False})  # type: ignore[union-attr]
    config = config.model_copy(update={"tls": tls})
    with structlog.testing.capture_logs() as logs:
        pub = run_publisher(config, tmp_path, lambda p: p.stats().outbox_depth == 0)
    assert pub.stats().outbox_depth == 0
    warnings = [e for e in logs if e["event"] == "tls_hostname_check_off"]
    assert [(w["log_level"], w["host"]) for w in warnings] == [("warning", "127.0.0.1")]


def test_no_password_appears_in_logs_stats_or_reprs(
    tls_broker: Mosquitto,
    pki: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream = io.StringIO()
    configure_logging("debug", "json", stream)
    caplog.set_level(logging.DEBUG)
    try:
        for i, password in enumerate((PASSWORD, PASSWORD + "-wrong")):
            monkeypatch.setenv("DEFECTD_TEST_MQTT_PW", password)
            config = tls_config(tls_broker, pki, password_env="DEFECTD_TEST_MQTT_PW")
            work = tmp_path / str(i)
            pub = run_publisher(config, work, lambda p: p.stats().connect_failures >= 1
                                or p.stats().outbox_depth == 0)  # fmt: skip
            seen = [repr(config), repr(pub.stats()), repr(pub.__dict__)]
            assert not any(PASSWORD in s for s in seen)
    finally:
        structlog.reset_defaults()
    text = stream.getvalue()
    assert "broker_connected" in text and "broker_refused" in text  # the logs were captured
    assert PASSWORD not in text
    assert PASSWORD not in caplog.text
