"""The reference consumer: subscribe to results and rejects, de-duplicated by ``result_id``.

Delivery from the daemon is at least once (a message whose PUBACK was lost is sent again after
a reconnect or a restart), so a consumer must drop messages it has already seen. ``Watcher``
shows how: QoS 1 subscriptions, a persistent session when asked (clean start off, so the broker
queues messages while the consumer is away), and a bounded memory of recent ids per kind.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from defectd.errors import ConfigError, PublishError
from defectd.log import get_logger
from defectd.publish.config import MqttConfig, check_topic_level
from defectd.publish.connection import backoff_delay, connect_options, describe_reason, make_client

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Received:
    """One first-seen message: ``kind`` is ``result`` or ``reject``; ``payload`` the JSON."""

    kind: str
    topic: str
    payload: dict[str, Any]


@dataclass(slots=True)
class WatchSummary:
    """What a watch saw: unique messages delivered, duplicates dropped, unreadable payloads."""

    unique: int = 0
    duplicates: int = 0
    invalid: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    duplicates_by_kind: dict[str, int] = field(default_factory=dict)
    connects: int = 0


class _Seen:
    """The last ``size`` ids, oldest forgotten first (memory stays bounded on a long watch)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._ids: OrderedDict[tuple[str, str], None] = OrderedDict()

    def add(self, key: tuple[str, str]) -> bool:
        """True when ``key`` is new."""
        if key in self._ids:
            self._ids.move_to_end(key)
            return False
        self._ids[key] = None
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)
        return True


class Watcher:
    """Subscribes to ``<prefix>/<station|+>/<camera|+>/result`` and ``<prefix>/<station|+>/reject``
    (only the latter with ``rejects_only``) and hands each first-seen message to ``on_message``.

    ``persistent`` needs a stable ``client_id``: the broker keeps the session (and queues QoS 1
    messages) under it between runs. Raises ``ConfigError`` for a bad filter or a missing
    client id, ``PublishError`` from ``run`` when the broker refuses the connection.
    """

    def __init__(
        self,
        config: MqttConfig,
        on_message: Callable[[Received], None],
        *,
        station: str | None = None,
        camera: str | None = None,
        rejects_only: bool = False,
        persistent: bool = False,
        client_id: str | None = None,
        dedup_window: int = 100_000,
    ) -> None:
        try:
            if station is not None:
                check_topic_level(station, "station")
            if camera is not None:
                check_topic_level(camera, "camera")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if persistent and not client_id:
            raise ConfigError("a persistent session needs a stable client id (--client-id)")
        self._config = config
        self._on_message = on_message
        self._camera = camera
        self._persistent = persistent
        self._client_id = client_id or f"defectd-watch-{uuid.uuid4().hex[:8]}"
        st = station or "+"
        prefix = config.topic_prefix
        self.topics = [f"{prefix}/{st}/reject"]
        if not rejects_only:
            self.topics.insert(0, f"{prefix}/{st}/{camera or '+'}/result")
        self._seen = _Seen(dedup_window)
        self.summary = WatchSummary()
        self._refused: str | None = None
        self._lost = False
        self._subscribed = threading.Event()
        self._done = threading.Event()

    @property
    def subscribed(self) -> threading.Event:
        """Set once the broker acknowledged the subscriptions (on the first connect)."""
        return self._subscribed

    def run(
        self,
        *,
        count: int | None = None,
        timeout_s: float | None = None,
        stop: threading.Event | None = None,
    ) -> WatchSummary:
        """Receive until ``count`` unique messages, ``timeout_s`` seconds, or ``stop`` is set.

        An unreachable broker is retried with backoff; a refused connection raises
        ``PublishError`` naming the reason code. Disconnects cleanly at the end.
        """
        client = make_client(
            self._config,
            self._client_id,
            password=self._config.read_password(),
            persistent=self._persistent,
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
        )
        client.on_subscribe = self._on_subscribe
        client.on_message = lambda c, u, msg: self._handle(msg, count)
        client.connect_async(**connect_options(self._config, persistent=self._persistent))
        self._done.clear()
        rng = random.Random()
        attempt = 0
        connected = False
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while not self._done.is_set() and not (stop is not None and stop.is_set()):
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if not connected:
                    try:
                        rc = client.reconnect()
                        connected = rc == MQTTErrorCode.MQTT_ERR_SUCCESS
                        self._lost = False
                    except OSError as exc:
                        delay = backoff_delay(
                            attempt, self._config.reconnect_min_s, self._config.reconnect_max_s, rng
                        )
                        attempt += 1
                        (log.warning if attempt == 1 else log.debug)(
                            "watch_broker_unreachable",
                            host=self._config.host,
                            port=self._config.port,
                            reason=exc.strerror or str(exc),
                            retry_in_s=round(delay, 2),
                        )
                        (stop or self._done).wait(delay)
                        continue
                client.loop(timeout=0.1)
                if self._refused is not None:
                    raise PublishError(
                        f"broker {self._config.host}:{self._config.port} refused the connection:"
                        f" {self._refused}"
                    )
                if self._lost:
                    connected = False
                    attempt = 0
        finally:
            self._done.set()  # our own disconnect below is the normal end, not a loss
            if connected:
                client.disconnect()
                client.loop(timeout=0.2)
        return self.summary

    def _on_connect(self, client: mqtt.Client, reason_code: ReasonCode, session: bool) -> None:
        if reason_code.is_failure:
            self._refused = describe_reason(reason_code)
            return
        self.summary.connects += 1
        # Subscribe on every connect: a broker that lost its state has no session to resume.
        client.subscribe([(t, 1) for t in self.topics])
        log.info(
            "watch_connected",
            host=self._config.host,
            port=self._config.port,
            session_present=session,
            topics=self.topics,
        )

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        refused = [describe_reason(rc) for rc in reason_codes if rc.is_failure]
        if refused:
            self._refused = f"subscription refused: {', '.join(refused)}"
            return
        self._subscribed.set()

    def _on_disconnect(self, reason_code: ReasonCode) -> None:
        self._lost = True
        if not self._done.is_set():
            log.warning("watch_disconnected", reason=describe_reason(reason_code))
        else:
            log.info("watch_closed", reason=describe_reason(reason_code))

    def _handle(self, msg: mqtt.MQTTMessage, count: int | None) -> None:
        kind = "reject" if msg.topic.endswith("/reject") else "result"
        try:
            payload = json.loads(msg.payload)
            result_id = str(payload["result_id"])
        except (ValueError, KeyError, TypeError):
            self.summary.invalid += 1
            log.warning("watch_invalid_payload", topic=msg.topic, size=len(msg.payload))
            return
        if self._camera is not None and payload.get("camera") != self._camera:
            return
        s = self.summary
        if not self._seen.add((kind, result_id)):
            s.duplicates += 1
            s.duplicates_by_kind[kind] = s.duplicates_by_kind.get(kind, 0) + 1
            return
        s.unique += 1
        s.by_kind[kind] = s.by_kind.get(kind, 0) + 1
        self._on_message(Received(kind, msg.topic, payload))
        if count is not None and s.unique >= count:
            self._done.set()
