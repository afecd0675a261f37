"""One way to set up a paho client for every MQTT connection defectd holds.

The publisher (``mqtt``), the trigger listener (``triggers``), the reference consumer
(``watch``) and the reference PLC (``plcsim``) each own a connection. They share here: the client
built from ``MqttConfig`` (protocol, TLS, credentials, session, timeouts, no Nagle delay), the
matching ``connect`` arguments, the reconnect backoff, how a reason code is named in logs, and
``on_connection``, which hands paho's five-argument VERSION2 connect/disconnect callbacks to
handlers that take only what they use.
"""

from __future__ import annotations

import contextlib
import random
import socket
import ssl
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import SecretStr

from defectd.log import get_logger
from defectd.publish.config import MqttConfig

log = get_logger(__name__)

OnConnect = Callable[[mqtt.Client, ReasonCode, bool], None]
"""``(client, reason_code, session_present)``: the broker's CONNACK."""

OnDisconnect = Callable[[ReasonCode], None]
"""``(reason_code)``: the connection ended (our own disconnect or a loss)."""


def properties(packet_type: int) -> Properties:
    """MQTT 5 properties for ``packet_type`` (``PacketTypes.PUBLISH``, ``CONNECT`` ...)."""
    return Properties(packet_type)  # type: ignore[no-untyped-call]


def backoff_delay(attempt: int, min_s: float, max_s: float, rng: random.Random) -> float:
    """Seconds to wait before reconnect attempt ``attempt + 1`` (``attempt`` counts failures).

    Exponential: the cap doubles from ``min_s`` up to ``max_s``; the delay is drawn from
    ``[cap/2, cap]`` (never below ``min_s``) so that stations that lost the same broker do not
    reconnect in lockstep.
    """
    cap = min(max_s, min_s * 2.0 ** min(attempt, 32))
    return max(min_s, rng.uniform(cap / 2.0, cap))


def make_client(
    config: MqttConfig,
    client_id: str,
    *,
    password: SecretStr | None,
    persistent: bool = True,
    on_connect: OnConnect | None = None,
    on_disconnect: OnDisconnect | None = None,
) -> mqtt.Client:
    """A paho client set up from ``config``: protocol, TLS, credentials, session, timeouts.

    ``persistent`` asks the broker to keep the session (clean start/session off). Call
    ``connect_options`` for the matching ``connect_async`` arguments. ``on_connect`` and
    ``on_disconnect``, when given, are set as by ``on_connection``.
    """
    v5 = config.protocol == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else not persistent,
        reconnect_on_failure=False,
    )
    client.connect_timeout = config.connect_timeout_s
    client.on_socket_open = _no_delay
    if config.tls is not None:
        tls = config.tls
        client.tls_set(
            ca_certs=str(tls.ca_file),
            certfile=None if tls.cert_file is None else str(tls.cert_file),
            keyfile=None if tls.key_file is None else str(tls.key_file),
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
        client.tls_insecure_set(not tls.check_hostname)
        if not tls.check_hostname:
            # The chain is still verified, but any host holding a certificate of this CA
            # could stand in for the broker.
            log.warning(
                "tls_hostname_check_off",
                host=config.host,
                key="mqtt.tls.check_hostname",
                hint="the broker's certificate is not matched to its host name; turn it on "
                "unless the broker is reached by IP address on a closed cell network",
            )
    if config.username is not None:
        client.username_pw_set(
            config.username, None if password is None else password.get_secret_value()
        )
    if on_connect is not None and on_disconnect is not None:
        on_connection(client, on_connect, on_disconnect)
    return client


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    # Small packets (PUBLISH, PUBACK) must not wait for Nagle's algorithm: without this a
    # result waits for the next one before it leaves, and latency tracks the part rate.
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect_options(config: MqttConfig, *, persistent: bool = True) -> dict[str, Any]:
    """Keyword arguments for ``Client.connect_async``/``connect`` matching ``make_client``."""
    opts: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        "keepalive": config.keepalive_s,
    }
    if config.protocol == "5":
        opts["clean_start"] = not persistent
        if persistent:
            props = properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = config.session_expiry_s
            opts["properties"] = props
    return opts


def describe_reason(rc: ReasonCode | MQTTErrorCode | int) -> str:
    """``"Not authorized (135)"``: the name and number of an MQTT reason or paho error code."""
    if isinstance(rc, ReasonCode):
        return f"{rc.getName()} ({rc.value})"
    if isinstance(rc, MQTTErrorCode):
        return f"{mqtt.error_string(rc)} ({rc.value})"
    return str(rc)


def on_connection(client: mqtt.Client, on_connect: OnConnect, on_disconnect: OnDisconnect) -> None:
    """Set ``client``'s connect and disconnect callbacks to ``on_connect``/``on_disconnect``.

    paho (VERSION2) calls them with the client, userdata, flags, reason code and properties;
    defectd's connections use only the reason code and, on connect, ``session_present``. The
    handlers run where paho runs its callbacks (the thread that drives the client's loop).
    """

    def connected(
        c: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        props: Properties | None,
    ) -> None:
        on_connect(c, reason_code, flags.session_present)

    def disconnected(
        c: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        props: Properties | None,
    ) -> None:
        on_disconnect(reason_code)

    client.on_connect = connected
    client.on_disconnect = disconnected
