"""``defectd watch`` and its Watcher: results and rejects once each, in arrival order."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from defectd.cli import main
from defectd.pipeline.inspection import Inspection, Verdict
from defectd.publish import MqttConfig, OutboxConfig, Publisher
from defectd.publish.messages import encode, reject_message, result_message
from defectd.publish.watch import Received, Watcher
from defectd.testing.mosquitto import Mosquitto


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()  # the CLI configures logging globally


@pytest.fixture
def broker(mosquitto: Callable[..., Mosquitto]) -> Mosquitto:
    return mosquitto()


def publish(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


def fail_and_pass() -> tuple[Inspection, Inspection]:
    t = time.time()
    bad = Inspection("st1", "cam0", 1, Verdict.FAIL, rule="count>3", t_grab_wall=t)
    good = Inspection("st1", "cam1", 2, Verdict.PASS, t_grab_wall=t)
    return bad, good


def watch_args(broker: Mosquitto, *extra: str) -> list[str]:
    return ["watch", "--host", broker.host, "--port", str(broker.port), "--prefix", "w", *extra]


def test_each_message_is_printed_once_though_the_broker_delivers_it_twice(
    broker: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    session = ["--persistent", "--client-id", "plc-1"]
    assert main(watch_args(broker, *session, "--timeout", "0.5")) == 0  # creates the session
    capsys.readouterr()
    bad, good = fail_and_pass()
    t = time.time()
    res_bad = ("w/st1/cam0/result", encode(result_message(bad, t)))
    publish(broker, [res_bad, res_bad, ("w/st1/reject", encode(reject_message(bad, t))),
                     ("w/st1/cam1/result", encode(result_message(good, t)))])  # fmt: skip

    code = main(watch_args(broker, *session, "--json", "--count", "3", "--timeout", "10"))

    out, err = capsys.readouterr()
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    # one publisher, one subscriber: the broker keeps the publishing order
    assert [(p["kind"], p["seq"]) for p in lines] == [("result", 1), ("reject", 1), ("result", 2)]
    assert "1 duplicates dropped" in err


def test_rejects_only_prints_only_rejects_in_human_form(
    broker: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    session = ["--persistent", "--client-id", "plc-2", "--rejects-only"]
    assert main(watch_args(broker, *session, "--timeout", "0.5")) == 0
    capsys.readouterr()
    bad, good = fail_and_pass()
    t = time.time()
    publish(broker, [("w/st1/cam1/result", encode(result_message(good, t))),
                     ("w/st1/reject", encode(reject_message(bad, t)))])  # fmt: skip

    assert main(watch_args(broker, *session, "--count", "1", "--timeout", "10")) == 0

    (line,) = capsys.readouterr().out.splitlines()
    assert line.split()[1] == "REJECT"
    assert f"id={bad.result_id}" in line and "rule=count>3" in line and "st1/cam0" in line


def test_count_not_reached_before_the_timeout_exits_1(
    broker: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(watch_args(broker, "--count", "1", "--timeout", "0.5")) == 1
    assert "only 0 of 1 messages arrived" in capsys.readouterr().err


def test_a_persistent_watch_without_a_client_id_is_an_error(
    broker: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(watch_args(broker, "--persistent", "--timeout", "0.1")) == 2
    assert "error: a persistent session needs a stable client id" in capsys.readouterr().err


def test_the_watcher_sees_what_a_publisher_submits(broker: Mosquitto, tmp_path: Path) -> None:
    config = MqttConfig(host=broker.host, port=broker.port, topic_prefix="w")
    seen: list[Received] = []
    watcher = Watcher(config, seen.append, station="st1")
    thread = threading.Thread(target=lambda: watcher.run(count=3, timeout_s=15), name="watch")
    thread.start()
    assert watcher.subscribed.wait(10)
    pub = Publisher(config, OutboxConfig(path=tmp_path / "o.sqlite"), "st1")
    pub.start()
    bad, good = fail_and_pass()
    pub.submit(bad)
    pub.submit(good)
    thread.join(15)
    pub.stop()
    assert sorted((r.kind, r.payload["seq"]) for r in seen) == [
        ("reject", 1), ("result", 1), ("result", 2),
    ]  # fmt: skip
    assert watcher.summary.duplicates == 0


def test_a_multi_class_result_line_counts_defects_per_class() -> None:
    from defectd.cli.watch_cmd import _line

    payload = {
        "verdict": "fail",
        "station": "s",
        "camera": "c",
        "seq": 3,
        "rule": "scratches:area>=2mm2",
        "defects": [{"class": "scratches"}, {"class": "patches"}, {"class": "scratches"}],
    }
    line = _line("result", payload, color=False)
    assert "defects=3  patches:1,scratches:2  rule=scratches:area>=2mm2" in line
    one_class = _line("result", {**payload, "defects": [{"class": "defect"}]}, color=False)
    assert "defects=1  rule=" in one_class
