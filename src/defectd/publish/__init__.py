"""Results to the PLCs: durable outbox, MQTT publisher, message contract and ``watch``.

Call sites use ``Publisher(MqttConfig, OutboxConfig, station)``: ``start()``, ``submit(inspection)``
(durable on return, never waits for the network), ``publish_event(kind, **fields)``,
``set_status(StatusInfo)``, ``stats()``, ``stop(drain_timeout_s)``.
"""

from defectd.publish.config import MqttConfig, OutboxConfig, TlsConfig
from defectd.publish.messages import SCHEMA_VERSION, StatusInfo, Topics
from defectd.publish.mqtt import Publisher, PublisherStats
from defectd.publish.outbox import Outbox, OutboxMessage, OutboxRow, OutboxStats

__all__ = [
    "SCHEMA_VERSION",
    "MqttConfig",
    "Outbox",
    "OutboxConfig",
    "OutboxMessage",
    "OutboxRow",
    "OutboxStats",
    "Publisher",
    "PublisherStats",
    "StatusInfo",
    "TlsConfig",
    "Topics",
]
