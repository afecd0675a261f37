"""Settings of the MQTT connection and of the durable outbox (frozen, validated once at start)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, FilePath, SecretStr, model_validator

from defectd.errors import ConfigError

# One MQTT topic level: no separators, no wildcards, no control characters.
_TOPIC_LEVEL = re.compile(r"^[^/#+\x00-\x1f]+$")


def check_topic_level(value: str, key: str) -> str:
    """Return ``value`` when it is usable as one MQTT topic level, else raise ``ValueError``.

    ``key`` names the setting in the message (e.g. ``station`` or ``camera``).
    """
    if not _TOPIC_LEVEL.match(value):
        raise ValueError(f"{key} {value!r} cannot be an MQTT topic level (no '/', '+', '#')")
    return value


class TlsConfig(BaseModel):
    """TLS to the broker: the CA that signed the broker's certificate, optionally a client pair."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ca_file: FilePath
    cert_file: FilePath | None = None
    key_file: FilePath | None = None
    # Off only for a broker reached by IP address on a closed cell network; never by default.
    check_hostname: bool = True

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError(
                "cert_file and key_file go together (a client certificate needs its key)"
            )
        return self


class MqttConfig(BaseModel):
    """The broker connection. Passwords are read from a file or an environment variable only.

    QoS, retain and session settings are explicit: results go out with ``result_qos`` (1 by
    default), ``status`` is retained, and the session is kept by the broker for
    ``session_expiry_s`` after a disconnect (MQTT 5 clean start off; MQTT 3.1.1 clean session
    off) so messages in flight survive a reconnect.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str | None = Field(
        None, min_length=1, max_length=128, description="default: defectd-<station>"
    )
    keepalive_s: int = Field(30, ge=5, le=65535)
    session_expiry_s: int = Field(7 * 86400, ge=0, le=0xFFFFFFFF)
    topic_prefix: str = "defectd"
    result_qos: Literal[0, 1, 2] = 1
    tls: TlsConfig | None = None
    username: str | None = Field(None, min_length=1)
    password_file: Path | None = None
    password_env: str | None = Field(None, min_length=1)
    reconnect_min_s: float = Field(0.5, gt=0, le=60)
    reconnect_max_s: float = Field(30.0, gt=0, le=3600)
    connect_timeout_s: float = Field(5.0, gt=0, le=120)
    # MQTT 5 message expiry for results, rejects and events; None: kept until delivered.
    message_expiry_s: int | None = Field(None, ge=1)
    max_inflight: int = Field(100, ge=1, le=10_000)

    @model_validator(mode="before")
    @classmethod
    def _no_password_literal(cls, data: Any) -> Any:
        if isinstance(data, dict) and "password" in data:
            raise ValueError(
                "password: a password literal is not accepted; use password_file or password_env"
            )
        return data

    @model_validator(mode="after")
    def _check(self) -> MqttConfig:
        for level in self.topic_prefix.split("/"):
            check_topic_level(level, "topic_prefix")
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("password_file and password_env: give one of them, not both")
        if (self.password_file or self.password_env) and self.username is None:
            raise ValueError("username: required when a password is configured")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError("reconnect_min_s must not exceed reconnect_max_s")
        return self

    def client_id_for(self, station: str) -> str:
        """The MQTT client id: ``client_id`` when set, else ``defectd-<station>``.

        It must be stable across restarts: the broker keeps the session under this id.
        """
        return self.client_id if self.client_id is not None else f"defectd-{station}"

    def read_password(self) -> SecretStr | None:
        """The broker password from ``password_file`` or ``password_env`` (None when neither).

        The value is wrapped in ``SecretStr`` so it never shows in a repr or a log field.
        Raises ``ConfigError`` naming the key when the file or variable is missing or empty.
        """
        if self.password_file is not None:
            try:
                text = self.password_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(
                    f"mqtt.password_file: cannot read {self.password_file}: {exc.strerror}"
                ) from None
            value = text.rstrip("\r\n")
            if not value:
                raise ConfigError(f"mqtt.password_file: {self.password_file} is empty")
            return SecretStr(value)
        if self.password_env is not None:
            env = os.environ.get(self.password_env)
            if not env:
                raise ConfigError(
                    f"mqtt.password_env: environment variable {self.password_env} is not set"
                )
            return SecretStr(env)
        return None


class OutboxConfig(BaseModel):
    """The durable outbox: a SQLite database (WAL) holding every message until its PUBACK.

    Bounds: at ``max_rows`` the oldest rows of the lowest priority are dropped first (pass
    results and events before fail/error results, rejects); pass results and events older than
    ``max_age_s`` expire. Fail/error results and rejects never expire by age: only the row bound
    can drop them, and each such drop is logged as an error with its result id. Nearing either
    bound (``warn_fraction``) is logged, published as an ``outbox_near_bound`` event and shown
    in the stats.

    ``synchronous``: ``normal`` survives a crash or SIGKILL of the daemon (the commit is in the
    OS before ``put`` returns, ~20 µs); ``full`` also survives a power cut (an fsync per
    commit, milliseconds on most disks).

    Disk full: ``reserve_bytes`` are held in a file beside the outbox (``<path>.reserve``) and
    given up when a write finds the disk full, so that a checkpoint and the acknowledgements
    that shrink the outbox can still be written; the reserve is taken again once the disk has
    room. The write-ahead log is checkpointed every ``checkpoint_interval_s`` and as soon as it
    exceeds ``wal_max_bytes``; a failed checkpoint is retried on the next housekeeping pass.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path
    max_rows: int = Field(1_000_000, ge=10)
    max_age_s: float = Field(7 * 86400.0, gt=0)
    warn_fraction: float = Field(0.8, gt=0, le=1)
    synchronous: Literal["normal", "full"] = "normal"
    reserve_bytes: int = Field(4 * 1024 * 1024, ge=0, description="0: no reserve")
    wal_max_bytes: int = Field(4 * 1024 * 1024, ge=64 * 1024)
    checkpoint_interval_s: float = Field(10.0, gt=0, le=3600)
