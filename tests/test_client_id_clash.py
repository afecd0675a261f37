"""Two stations with one client id: the clash is detected, named in the log and reported."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from defectd.publish import MqttConfig, OutboxConfig, Publisher
from defectd.publish.takeover import SESSION_TAKEN_OVER, TakeoverDetector
from defectd.testing.mosquitto import Mosquitto
from defectd.testing.wait import wait_until


def publisher(broker: Mosquitto, outbox: Path) -> Publisher:
    config = MqttConfig(
        host=broker.host, port=broker.port, topic_prefix="t", reconnect_min_s=0.1,
        reconnect_max_s=0.3,
    )  # fmt: skip
    return Publisher(config, OutboxConfig(path=outbox), "st1")  # client id defectd-st1


def test_two_publishers_with_one_client_id_are_told_they_clash(
    mosquitto: Callable[..., Mosquitto], mqtt_collector: Callable[..., Any], tmp_path: Path
) -> None:
    broker = mosquitto()
    events = mqtt_collector(broker.host, broker.port, "t/st1/events")
    first, second = (
        publisher(broker, tmp_path / "a.sqlite"),
        publisher(broker, tmp_path / "b.sqlite"),
    )
    with capture_logs() as logs:
        first.start()
        assert wait_until(lambda: first.stats().connected, 10)
        second.start()
        try:
            assert wait_until(
                lambda: first.stats().client_id_clash and second.stats().client_id_clash, 30
            ), (first.stats(), second.stats())
            assert events.wait_for(
                lambda _: any(p["event"] == "client_id_clash" for p in events.payloads("/events")),
                20,
            )
        finally:
            second.stop(drain_timeout_s=1)
        # Alone again: the connection holds and the clash is over.
        assert wait_until(lambda: first.stats().connected and not first.stats().client_id_clash, 20)
        first.stop(drain_timeout_s=1)
    lines = [e for e in logs if e["event"] == "client_id_clash"]
    assert lines and all(e["log_level"] == "error" for e in lines)
    assert lines[0]["client_id"] == "defectd-st1" and "station id" in lines[0]["fix"]
    assert first.stats().client_id_clashes >= 1
    event = next(p for p in events.payloads("/events") if p["event"] == "client_id_clash")
    assert event["severity"] == "error" and event["data"]["client_id"] == "defectd-st1"


def test_a_broker_restart_is_not_a_clash_but_a_taken_over_session_is_at_once() -> None:
    detector = TakeoverDetector(window_s=5.0, repeats=3)
    detector.connected(0.0)
    assert detector.disconnected(128, 1.0) is None  # the broker went down soon after a connect
    detector.connected(30.0)  # back after an outage, and it holds
    assert detector.disconnected(128, 100.0) is None
    for t in (200.0, 201.0):
        detector.connected(t)
        assert detector.disconnected(128, t + 0.5) is None
    detector.connected(202.0)
    assert detector.disconnected(128, 202.5) is not None  # the third quick drop in a row
    assert detector.active and detector.clashes == 1
    detector.connected(300.0)
    detector.settled(306.0)
    assert not detector.active
    assert "taken over" in str(detector.disconnected(SESSION_TAKEN_OVER, 306.5))
