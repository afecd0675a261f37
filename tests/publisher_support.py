"""A publisher on a test broker and a subscriber that sees all it sends: the setup that the
MQTT publisher and line-contract tests share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from defectd.publish import MqttConfig, OutboxConfig, Publisher
from defectd.testing.mosquitto import Mosquitto

PREFIX = "t"


def make_publisher(
    broker: Mosquitto, tmp_path: Path, *, reconnect_max_s: float = 0.5, **mqtt: Any
) -> Publisher:
    """A publisher for station ``st1`` on ``broker`` (topic prefix ``t``), reconnecting quickly,
    with its outbox at ``tmp_path/outbox.sqlite``; not started."""
    config = MqttConfig(
        host=broker.host, port=broker.port, topic_prefix=PREFIX, reconnect_min_s=0.1,
        reconnect_max_s=reconnect_max_s, **mqtt,
    )  # fmt: skip
    return Publisher(config, OutboxConfig(path=tmp_path / "outbox.sqlite"), "st1")


def started_publisher(
    mosquitto: Callable[..., Mosquitto],
    mqtt_collector: Callable[..., Any],
    tmp_path: Path,
    *,
    reconnect_max_s: float = 0.5,
) -> tuple[Any, Publisher]:
    """On a fresh broker, a collector subscribed to everything under the prefix and a started
    publisher: ``(collector, publisher)``; the caller stops the publisher."""
    broker = mosquitto()
    sub = mqtt_collector(broker.host, broker.port, f"{PREFIX}/#")
    pub = make_publisher(broker, tmp_path, reconnect_max_s=reconnect_max_s)
    pub.start()
    return sub, pub
