"""MQTT and outbox settings: validation that names the key, secrets, reconnect backoff."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from pydantic import ValidationError

from defectd.errors import ConfigError
from defectd.publish import MqttConfig, OutboxConfig, Publisher
from defectd.publish.connection import backoff_delay


def test_a_password_literal_is_refused_with_a_pointer_to_the_alternatives() -> None:
    with pytest.raises(ValidationError, match="password_file or password_env"):
        MqttConfig.model_validate({"username": "u", "password": "hunter2"})


def test_unknown_keys_are_refused() -> None:
    with pytest.raises(ValidationError, match="qos_results"):
        MqttConfig.model_validate({"qos_results": 1})


def test_a_password_needs_a_username() -> None:
    with pytest.raises(ValidationError, match="username"):
        MqttConfig(password_env="X")


def test_a_topic_prefix_with_a_wildcard_is_refused() -> None:
    with pytest.raises(ValidationError, match="topic_prefix"):
        MqttConfig(topic_prefix="plant/+")


def test_a_station_id_that_cannot_be_a_topic_level_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="station 'line/7'"):
        Publisher(MqttConfig(), OutboxConfig(path=tmp_path / "o.sqlite"), "line/7")


def test_the_client_id_defaults_to_the_station_id() -> None:
    assert MqttConfig().client_id_for("line7") == "defectd-line7"
    assert MqttConfig(client_id="plc-feed").client_id_for("line7") == "plc-feed"


def test_a_missing_password_variable_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_PW", raising=False)
    config = MqttConfig(username="u", password_env="NO_SUCH_PW")
    with pytest.raises(ConfigError, match=r"mqtt.password_env: environment variable NO_SUCH_PW"):
        config.read_password()


def test_the_password_file_is_read_without_its_newline_and_hidden_in_reprs(
    tmp_path: Path,
) -> None:
    (tmp_path / "pw").write_text("hunter2\n")
    secret = MqttConfig(username="u", password_file=tmp_path / "pw").read_password()
    assert secret is not None
    assert secret.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(secret) and "hunter2" not in str(secret)


def test_an_unreadable_password_file_names_the_key(tmp_path: Path) -> None:
    config = MqttConfig(username="u", password_file=tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"mqtt.password_file: cannot read"):
        config.read_password()


def test_tls_needs_a_key_with_a_client_certificate(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "c.crt").write_text("x")
    with pytest.raises(ValidationError, match="cert_file and key_file"):
        MqttConfig.model_validate(
            {"tls": {"ca_file": tmp_path / "ca.crt", "cert_file": tmp_path / "c.crt"}}
        )


def test_outbox_bounds_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="max_rows"):
        OutboxConfig(path=tmp_path / "o", max_rows=0)


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(a, 0.5, 30.0, rng) for a in range(12)]
    assert delays[0] == 0.5
    for attempt, delay in enumerate(delays):
        cap = min(30.0, 0.5 * 2**attempt)
        assert max(0.5, cap / 2) <= delay <= cap
    assert max(delays) <= 30.0
    assert len({round(d, 6) for d in delays[6:]}) > 1  # jittered, not lockstep
