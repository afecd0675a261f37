"""OPC UA test support: a PKI (server pair, a trusted and an untrusted client, a users file)
and an asyncua client that collects Verdict events, used by the OPC UA tests and the bench."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defectd.opcua.certs import add_user, make_certificate
from defectd.opcua.config import OpcUaConfig

STATION = "st1"
USER, PASSWORD = "plc", "gate-4711"
CLIENT_URI = "urn:defectd:test:plc"


@dataclass(frozen=True)
class Pki:
    server_cert: Path
    server_key: Path
    trusted: Path  # folder
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate nobody trusted
    rogue_key: Path
    users: Path


def make_pki(root: Path, station: str = STATION) -> Pki:
    root.mkdir(parents=True, exist_ok=True)
    (root / "trusted").mkdir(exist_ok=True)
    uri = f"urn:defectd:{station}:server"
    make_certificate(
        root / "server.der",
        root / "server.key.pem",
        application_uri=uri,
        common_name=f"defectd {station}",
        hosts=("localhost", "127.0.0.1"),
    )
    make_certificate(
        root / "trusted" / "plc.der",
        root / "plc.key.pem",
        application_uri=CLIENT_URI,
        common_name="plc",
        role="client",
    )
    make_certificate(
        root / "rogue.der",
        root / "rogue.key.pem",
        application_uri=CLIENT_URI,
        common_name="rogue",
        role="client",
    )
    add_user(root / "users", USER, PASSWORD)
    return Pki(
        root / "server.der",
        root / "server.key.pem",
        root / "trusted",
        root / "trusted" / "plc.der",
        root / "plc.key.pem",
        root / "rogue.der",
        root / "rogue.key.pem",
        root / "users",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def opcua_config(pki: Pki, port: int | None = None, **kw: Any) -> OpcUaConfig:
    return OpcUaConfig(
        endpoint=f"opc.tcp://127.0.0.1:{port or free_port()}/defectd/",
        certificate=pki.server_cert,
        private_key=pki.server_key,
        trusted_clients=pki.trusted,
        users_file=pki.users,
        **kw,
    )


def opcua_toml(pki: Pki, port: int, extra: str = "") -> str:
    return f"""
[opcua]
endpoint = "opc.tcp://127.0.0.1:{port}/defectd/"
certificate = "{pki.server_cert}"
private_key = "{pki.server_key}"
trusted_clients = "{pki.trusted}"
users_file = "{pki.users}"
{extra}
"""


@dataclass
class Events:
    """Verdict events as they arrive (asyncua ``Event`` objects), in order."""

    items: list[Any] = field(default_factory=list)

    def event_notification(self, event: Any) -> None:
        self.items.append(event)

    def datachange_notification(self, node: Any, value: Any, data: Any) -> None:
        self.items.append(value)


async def connect(
    url: str,
    pki: Pki,
    *,
    user: str | None = USER,
    password: str | None = PASSWORD,
    cert: Path | None = None,
    key: Path | None = None,
    secure: bool = True,
) -> Any:
    """A connected asyncua client (Basic256Sha256 Sign&Encrypt unless ``secure`` is off)."""
    from asyncua import Client, ua
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

    client = Client(url, timeout=10)
    client.application_uri = CLIENT_URI
    if secure:
        await client.set_security(
            SecurityPolicyBasic256Sha256,
            str(cert or pki.client_cert),
            str(key or pki.client_key),
            server_certificate=str(pki.server_cert),
            mode=ua.MessageSecurityMode.SignAndEncrypt,
        )
    if user is not None:
        client.set_user(user)
    if password is not None:
        client.set_password(password)
    await client.connect()
    return client


@contextlib.asynccontextmanager
async def closing(client: Any) -> AsyncIterator[Any]:
    """Disconnect a client from ``connect`` at the end (``async with client`` would connect it a
    second time, on a new session, orphaning subscriptions made on the first)."""
    try:
        yield client
    finally:
        await client.disconnect()


async def verdict_type(client: Any) -> Any:
    ns = await client.get_namespace_index(f"urn:defectd:{STATION}")
    return await client.nodes.base_event_type.get_child(f"{ns}:VerdictEventType")


async def station_node(client: Any, station: str = STATION) -> tuple[Any, int]:
    from asyncua import ua

    ns = await client.get_namespace_index(f"urn:defectd:{station}")
    return client.get_node(ua.NodeId(station, ns)), ns


async def read(client: Any, ns: int, path: str) -> Any:
    from asyncua import ua

    return await client.get_node(ua.NodeId(path, ns)).read_value()


async def wait_for(predicate: Any, timeout: float = 20.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.02)
    return True
