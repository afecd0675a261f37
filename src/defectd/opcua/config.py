"""``[opcua]``: the station's OPC UA server (docs/opcua.md).

::

    [opcua]
    endpoint = "opc.tcp://0.0.0.0:4840/defectd/"
    certificate = "opcua/server.der"        # defectd opcua cert writes both
    private_key = "opcua/server.key.pem"
    trusted_clients = "opcua/trusted"       # the client certificates let in (DER or PEM)
    users_file = "opcua/users"              # defectd opcua user NAME appends a hashed password

Secure by default: the only endpoint is ``Basic256Sha256`` Sign&Encrypt, a client is let in
only with a certificate from ``trusted_clients`` and a user name and password from
``users_file``; anonymous sessions are refused unless ``allow_anonymous = true``. Paths are
relative to the config file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SecurityPolicy = Literal["Basic256Sha256_SignAndEncrypt", "Basic256Sha256_Sign", "None"]


class OpcUaConfig(BaseModel):
    """The OPC UA server of a station.

    ``namespace`` and ``application_uri`` default to ``urn:defectd:<station>`` and
    ``urn:defectd:<station>:server`` (``namespace_for``/``application_uri_for``); the server
    certificate must name the application URI (``defectd opcua cert`` does). ``history_size``
    verdict events per camera (and at most ``history_s`` old) stay readable with HistoryRead;
    ``recent_size`` is the ring of recent verdicts as plain array nodes, for PLCs that can only
    read. ``queue_size`` bounds the verdicts waiting for the server thread: beyond it a verdict
    is not shown over OPC UA and is counted (``EventsDropped``); MQTT still carries it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    endpoint: str = "opc.tcp://0.0.0.0:4840/defectd/"
    namespace: str | None = Field(default=None, min_length=1)
    application_uri: str | None = Field(default=None, min_length=1)
    security_policies: tuple[SecurityPolicy, ...] = ("Basic256Sha256_SignAndEncrypt",)
    certificate: Path | None = None
    private_key: Path | None = None
    trusted_clients: Path | None = None
    users_file: Path | None = None
    allow_anonymous: bool = False
    history_size: int = Field(default=1000, ge=1, le=1_000_000)
    history_s: float = Field(default=3600.0, gt=0)
    recent_size: int = Field(default=16, ge=1, le=1024)
    queue_size: int = Field(default=10_000, ge=16, le=1_000_000)

    @field_validator("endpoint")
    @classmethod
    def _opc_tcp(cls, value: str) -> str:
        url = urlparse(value)
        if url.scheme != "opc.tcp" or not url.hostname:
            raise ValueError(f"expected opc.tcp://HOST:PORT/PATH, got {value!r}")
        try:
            port = url.port
        except ValueError:
            port = None
        if port is None:
            raise ValueError(f"the endpoint needs a port (0 = any free port): {value!r}")
        return value

    @field_validator("security_policies")
    @classmethod
    def _some_policy(cls, value: tuple[SecurityPolicy, ...]) -> tuple[SecurityPolicy, ...]:
        if not value:
            raise ValueError("at least one policy is needed")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> OpcUaConfig:
        if self.secure:
            missing = [
                k for k in ("certificate", "private_key", "trusted_clients") if not getattr(self, k)
            ]
            if missing:
                raise ValueError(
                    f"{', '.join(missing)}: required for the {self.security_policies[0]} "
                    "endpoint (defectd opcua cert creates the server pair; trusted_clients is "
                    "the folder of client certificates let in)"
                )
        if self.users_file is None and not self.allow_anonymous:
            raise ValueError(
                "users_file: required unless allow_anonymous = true (no client could log in)"
            )
        return self

    @property
    def secure(self) -> bool:
        """Whether any endpoint signs (then the server needs its certificate and key)."""
        return any(p != "None" for p in self.security_policies)

    @property
    def port(self) -> int:
        port = urlparse(self.endpoint).port
        assert port is not None  # checked by the validator
        return port

    def namespace_for(self, station: str) -> str:
        return self.namespace or f"urn:defectd:{station}"

    def application_uri_for(self, station: str) -> str:
        return self.application_uri or f"urn:defectd:{station}:server"
