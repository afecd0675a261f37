"""Triggers from the PLC: a subscriber on ``<prefix>/<station>/<camera>/trigger``.

``TriggerListener`` holds its own MQTT connection (client id ``<publisher's id>-triggers``), so
that receiving parts never waits behind the publisher's outbox and a broker refusing one does
not stop the other. It connects with clean start on: a trigger that arrives after a broker
outage is for a part that has already passed the camera, so the broker must not keep old ones
for us (those parts get no verdict and the PLC rejects them; see docs/plc.md). It reconnects
with the publisher's backoff. Each message is handed to ``on_trigger`` from the listener's
thread (``mqtt-triggers-<station>``) with its receive times and its MQTT 5 correlation data and
response topic; parsing and pairing are the caller's (``defectd.pipeline.parts``).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from defectd.errors import ConfigError, PublishError
from defectd.log import get_logger
from defectd.publish.config import MqttConfig, check_topic_level
from defectd.publish.connection import backoff_delay, connect_options, describe_reason, make_client
from defectd.publish.messages import Topics

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class TriggerMessage:
    """One received trigger: ``camera`` from its topic, the raw payload, MQTT 5 properties and
    when it arrived (``t_wall``: ``time.time()``, ``t_ns``: ``time.monotonic_ns()``)."""

    camera: str
    payload: bytes
    correlation_data: bytes | None
    response_topic: str | None
    t_wall: float
    t_ns: int


OnTrigger = Callable[[TriggerMessage], None]


class TriggerListener:
    """Subscribes (QoS 1) to the trigger topics of ``cameras`` and calls ``on_trigger``.

    ``start()`` returns at once (a broker that is down is retried); ``stop()`` is idempotent.
    ``connected`` and ``received`` are for health and tests. ``on_trigger`` runs on the
    listener's thread and must be quick.
    """

    def __init__(
        self,
        config: MqttConfig,
        station: str,
        cameras: Sequence[str],
        on_trigger: OnTrigger,
        *,
        client_id: str | None = None,
    ) -> None:
        try:
            for camera in cameras:
                check_topic_level(camera, "camera")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._config = config
        self._topics = Topics(config.topic_prefix, station)
        self._cameras = tuple(cameras)
        self._on_trigger = on_trigger
        self._client_id = client_id or f"{config.client_id_for(station)}-triggers"
        self._password = config.read_password()
        self._station = station
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self._rng = random.Random()
        self.connected = threading.Event()
        self.received = 0
        self.connects = 0

    @property
    def client_id(self) -> str:
        return self._client_id

    def start(self) -> None:
        if self._thread is not None:
            raise PublishError("trigger listener already started")
        client = make_client(
            self._config,
            self._client_id,
            password=self._password,
            persistent=False,
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
        )
        client.on_message = self._on_message
        self._client = client
        self._thread = threading.Thread(
            target=self._run, name=f"mqtt-triggers-{self._station}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        client = self._client
        if client is not None:
            client.disconnect()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.error("trigger_listener_stuck", thread=thread.name)

    def _run(self) -> None:
        client = self._client
        assert client is not None
        opts = connect_options(self._config, persistent=False)
        attempt = 0
        while not self._stopping.is_set():
            try:
                client.connect(**opts)
            except (OSError, ValueError) as exc:
                delay = backoff_delay(
                    attempt, self._config.reconnect_min_s, self._config.reconnect_max_s, self._rng
                )
                attempt += 1
                (log.warning if attempt == 1 else log.debug)(
                    "trigger_broker_unreachable", error=str(exc), retry_in_s=round(delay, 2)
                )
                self._stopping.wait(delay)
                continue
            attempt = 0
            # Returns when the connection ends (make_client turns paho's own retries off).
            client.loop_forever()
            self.connected.clear()
            if not self._stopping.is_set():
                self._stopping.wait(self._config.reconnect_min_s)

    def _on_connect(self, client: mqtt.Client, reason_code: ReasonCode, session: bool) -> None:
        if reason_code.is_failure:
            log.error("trigger_broker_refused", reason=describe_reason(reason_code))
            return
        client.subscribe([(self._topics.trigger(c), 1) for c in self._cameras])
        self.connects += 1
        self.connected.set()
        log.info("trigger_listener_connected", cameras=list(self._cameras))

    def _on_disconnect(self, reason_code: ReasonCode) -> None:
        self.connected.clear()
        if not self._stopping.is_set():
            log.warning("trigger_listener_disconnected", reason=describe_reason(reason_code))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        t_ns = time.monotonic_ns()
        t_wall = time.time()
        levels = msg.topic.split("/")
        camera = levels[-2] if len(levels) >= 2 else ""
        props = msg.properties
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        response = getattr(props, "ResponseTopic", None) if props is not None else None
        self.received += 1
        try:
            self._on_trigger(
                TriggerMessage(
                    camera=camera,
                    payload=bytes(msg.payload),
                    correlation_data=None if correlation is None else bytes(correlation),
                    response_topic=response,
                    t_wall=t_wall,
                    t_ns=t_ns,
                )
            )
        except Exception:  # a failing consumer must not end the subscription
            log.exception("trigger_handler_failed", topic=msg.topic)
