"""The line contract end to end on a real Mosquitto: PLC triggers paired with frames, verdicts
that echo part id and correlation data, expiry = time to the gate, late verdicts on the ``late``
topic and never on ``reject``, parts without a frame -> ``error:no_frame``."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from defectd.daemon.config import load_station_config
from defectd.daemon.line import LineIntake
from defectd.daemon.sdnotify import SdNotifier
from defectd.daemon.service import Service
from defectd.model.card import card_path
from defectd.pipeline.frame import Frame
from defectd.pipeline.inspection import Inspection, Verdict
from defectd.pipeline.parts import LineConfig
from defectd.publish import Publisher
from defectd.publish.messages import schema_errors
from defectd.publish.triggers import TriggerMessage
from defectd.testing.mosquitto import Mosquitto
from publisher_support import PREFIX, make_publisher, started_publisher
from station_support import serving, synthetic_station


def verdict(v: Verdict, gate_in_s: float | None, **kw: Any) -> Inspection:
    now = time.time()
    return Inspection(
        "st1", "cam0", 3, v, rule="any-defect" if v is Verdict.FAIL else None, part_id="P-1",
        t_grab_wall=now, gate_deadline=None if gate_in_s is None else now + gate_in_s, **kw,
    )  # fmt: skip


def test_a_verdict_expires_when_its_part_reaches_the_gate(
    mosquitto: Callable[..., Mosquitto], mqtt_collector: Callable[..., Any], tmp_path: Path
) -> None:
    sub, pub = started_publisher(mosquitto, mqtt_collector, tmp_path, reconnect_max_s=0.3)
    try:
        item = verdict(Verdict.FAIL, 3.5, correlation="c0ffee")
        pub.submit(item)
        assert sub.wait_for(lambda ms: len(ms) >= 2)
    finally:
        pub.stop()
    by_topic = {m.topic: m for m in sub.messages}
    for topic in (f"{PREFIX}/st1/cam0/result", f"{PREFIX}/st1/reject"):
        msg = by_topic[topic]
        assert msg.properties.MessageExpiryInterval == 4  # 3.5 s to the gate, rounded up
        assert msg.properties.CorrelationData == bytes.fromhex("c0ffee")
        payload = json.loads(msg.payload)
        assert payload["gate_deadline"]["epoch"] == pytest.approx(item.gate_deadline)
        assert payload["late"] is False and payload["correlation"] == "c0ffee"
        assert schema_errors(payload["kind"], payload) == []
        assert not msg.retain  # rejects are never retained


def test_a_verdict_without_a_gate_has_no_expiry(
    mosquitto: Callable[..., Mosquitto], mqtt_collector: Callable[..., Any], tmp_path: Path
) -> None:
    sub, pub = started_publisher(mosquitto, mqtt_collector, tmp_path, reconnect_max_s=0.3)
    try:
        pub.submit(verdict(Verdict.PASS, None))
        assert sub.wait_for(lambda ms: len(ms) >= 1)
    finally:
        pub.stop()
    assert not hasattr(sub.messages[0].properties, "MessageExpiryInterval")


def test_a_verdict_that_misses_its_gate_goes_to_late_and_never_to_reject(
    mosquitto: Callable[..., Mosquitto], mqtt_collector: Callable[..., Any], tmp_path: Path
) -> None:
    broker = mosquitto()
    sub = mqtt_collector(
        broker.host, broker.port, f"{PREFIX}/st1/+/+", persistent=True, client_id="plc-1"
    )  # results, late verdicts; not status
    rejects = mqtt_collector(
        broker.host, broker.port, f"{PREFIX}/st1/reject", persistent=True, client_id="plc-2"
    )
    broker.stop()  # the broker is away while the part passes its gate
    pub = make_publisher(broker, tmp_path, reconnect_max_s=0.3)
    pub.start()
    try:
        late = verdict(Verdict.FAIL, 0.3, correlation="01")
        in_time = verdict(Verdict.FAIL, 60.0)
        pub.submit(late)
        time.sleep(0.5)
        broker.start()
        pub.submit(in_time)
        assert sub.wait_for(lambda ms: len(ms) >= 2, timeout=20)
        assert rejects.wait_for(lambda ms: len(ms) >= 1, timeout=20)
        time.sleep(0.3)  # nothing else may follow
        stats = pub.stats()
    finally:
        pub.stop()
    got = sorted(
        (m.topic, json.loads(m.payload)["result_id"]) for m in sub.messages + rejects.messages
    )
    assert got == sorted(
        [
            (f"{PREFIX}/st1/cam0/late", late.result_id),
            (f"{PREFIX}/st1/cam0/result", in_time.result_id),
            (f"{PREFIX}/st1/reject", in_time.result_id),
        ]
    )
    (late_msg,) = [m for m in sub.messages if m.topic.endswith("/late")]
    payload = json.loads(late_msg.payload)
    assert payload["late"] is True and payload["verdict"] == "fail"
    assert schema_errors("result", payload) == []
    assert not late_msg.retain and not hasattr(late_msg.properties, "MessageExpiryInterval")
    assert (stats.late, stats.late_withheld, stats.outbox_depth) == (1, 1, 0)


class SilentCamera:
    """A camera in request mode whose frames never come (a broken trigger line)."""

    camera = "cam0"

    def __init__(self) -> None:
        self.fired: list[str | None] = []

    def fire_trigger(self, world_key: str | None = None) -> None:
        self.fired.append(world_key)


def _intake(camera: Any, submit: Callable[[Frame], None], pub: Publisher) -> LineIntake:
    """A line intake for station ``st1`` with one camera (a ``StationCamera``): frames go to
    ``submit``; no-frame verdicts and line events go to ``pub``."""
    return LineIntake(
        "st1", [camera], submit=submit, on_no_frame=pub.submit,
        publish_event=lambda kind, fields: pub.publish_event(kind, **fields),
    )  # fmt: skip


def test_a_trigger_without_a_frame_gets_error_no_frame(
    mosquitto: Callable[..., Mosquitto], mqtt_collector: Callable[..., Any], tmp_path: Path
) -> None:
    from defectd.daemon.config import StationCamera
    from defectd.pipeline.sources import SyntheticSourceConfig

    sub, pub = started_publisher(mosquitto, mqtt_collector, tmp_path, reconnect_max_s=0.3)
    submitted: list[Frame] = []
    line = _intake(
        StationCamera(
            source=SyntheticSourceConfig(camera="cam0", trigger="request"),
            line=LineConfig(mode="plc-trigger", frame_timeout_ms=100),
        ),
        submitted.append,
        pub,
    )
    silent = SilentCamera()
    line.attach([silent])  # type: ignore[list-item]
    line.start()
    try:
        now = time.time()
        for part in ("P-1", "P-2"):
            line.on_trigger(
                TriggerMessage("cam0", json.dumps({"part_id": part, "gate_ms": 5000}).encode(),
                               b"\x07", None, now, time.monotonic_ns())
            )  # fmt: skip
        assert sub.wait_for(lambda ms: sum(m.topic.endswith("/reject") for m in ms) >= 2)
    finally:
        line.stop()
        pub.stop()
    rejects = sub.payloads("/reject")
    assert [r["part_id"] for r in rejects] == ["P-1", "P-2"]
    for r in rejects:
        assert (r["verdict"], r["rule"], r["seq"]) == ("error", "error:no_frame", -1)
        assert r["correlation"] == "07" and r["gate_deadline"]["epoch"] > now
        assert schema_errors("reject", r) == []
    assert silent.fired == ["P-1", "P-2"]  # one at a time, the second after the first expired
    assert submitted == []
    assert line.stats()["cam0"]["no_frame"] == 2


# --- the daemon with a PLC-triggered synthetic camera ------------------------------------------


def _station(model: Path, state: Path, port: int) -> str:
    return f"""
{synthetic_station("st1", model)}
trigger = "request"
height = 64
width = 64
defect_rate = 0.5
seed = 5
[cameras.line]
mode = "plc-trigger"
frame_timeout_ms = 2000
[mqtt]
port = {port}
topic_prefix = "{PREFIX}"
reconnect_min_s = 0.2
reconnect_max_s = 1
[health]
enabled = false
[archive]
enabled = false
[daemon]
state_dir = "{state}"
drain_timeout_s = 2
camera_idle_ok = true
"""


@pytest.fixture
def station(
    tmp_path: Path, tiny_model: Path, mosquitto: Callable[..., Mosquitto]
) -> Iterator[tuple[Service, Mosquitto]]:
    broker = mosquitto()
    model = tmp_path / "model.onnx"
    shutil.copy(tiny_model, model)
    shutil.copy(card_path(tiny_model), card_path(model))
    path = tmp_path / "station.toml"
    path.write_text(_station(model, tmp_path / "state", broker.port))
    service = Service(load_station_config(path), notifier=SdNotifier({}), install_signals=False)

    def listening() -> bool:
        return (t := service.trigger_listener) is not None and t.connected.is_set()

    with serving(service, listening, stop_s=20):
        yield service, broker


def test_plc_triggers_pair_with_frames_and_verdicts_echo_the_part(
    station: tuple[Service, Mosquitto], mqtt_collector: Callable[..., Any]
) -> None:
    service, broker = station
    sub = mqtt_collector(broker.host, broker.port, f"{PREFIX}/st1/cam0/result")
    plc = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    plc.connect(broker.host, broker.port)
    plc.loop_start()
    parts = [f"P-{n:03d}" for n in range(30)]
    try:
        for n, part in enumerate(parts):
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = n.to_bytes(2, "big")
            payload = {"part_id": part, "gate_deadline": time.time() + 20}
            plc.publish(f"{PREFIX}/st1/cam0/trigger", json.dumps(payload), 1, properties=props)
            time.sleep(0.01)
        assert sub.wait_for(lambda ms: len(ms) >= len(parts), timeout=30)
    finally:
        plc.loop_stop()
        plc.disconnect()
    results = sub.payloads("/result")
    assert sorted(r["part_id"] for r in results) == parts
    for msg in sub.messages:
        r = json.loads(msg.payload)
        n = parts.index(r["part_id"])
        assert r["correlation"] == n.to_bytes(2, "big").hex()
        assert msg.properties.CorrelationData == n.to_bytes(2, "big")
        assert 1 <= msg.properties.MessageExpiryInterval <= 20
        assert r["verdict"] in ("pass", "fail") and schema_errors("result", r) == []
    assert service.line is not None
    stats = service.line.stats()["cam0"]
    assert (stats["paired"], stats["unpaired_frames"], stats["mispaired"]) == (30, 0, 0)


def test_plc_sim_against_the_daemon_passes_parts_only_on_their_own_pass_verdict(
    station: tuple[Service, Mosquitto],
) -> None:
    from defectd.publish.plcsim import PlcSim, PlcSimConfig

    _, broker = station
    sim = PlcSim(
        PlcSimConfig(
            host=broker.host, port=broker.port, prefix=PREFIX, station="st1", camera="cam0",
            rate_hz=20.0, parts=60, gate_ms=3000.0, seed=5, defect_rate=0.5,
            client_id="plc-sim-test", settle_s=0.5,
        )
    )  # fmt: skip
    report = sim.run()
    assert (report.parts, report.system_escapes, report.unpaired, report.mispaired) == (60, 0, 0, 0)
    assert report.in_time == 60 and report.outcomes["system_reject"] == 0
    assert sum(report.outcomes.values()) == 60
    assert report.latency_ms_p99 is not None and report.latency_ms_p99 < 3000.0


def test_hardware_triggered_parts_pair_by_counter_and_a_dropped_frame_gets_no_frame(
    mosquitto: Callable[..., Mosquitto], mqtt_collector: Callable[..., Any], tmp_path: Path
) -> None:
    import numpy as np

    from defectd.daemon.config import StationCamera
    from defectd.pipeline.sources import DeviceSelector, GenICamSourceConfig

    sub, pub = started_publisher(mosquitto, mqtt_collector, tmp_path, reconnect_max_s=0.3)
    paired: list[Frame] = []
    camera = StationCamera(
        source=GenICamSourceConfig(camera="cam0", device=DeviceSelector(index=0)),
        line=LineConfig(mode="hw-counter", frame_timeout_ms=150),
    )
    line = _intake(camera, paired.append, pub)
    line.start()
    try:
        now = time.time()
        for n in range(6):
            body = {"part_id": f"P-{n}", "counter": 500 + n, "gate_ms": 5000}
            line.on_trigger(
                TriggerMessage("cam0", json.dumps(body).encode(), None, None, now,
                               time.monotonic_ns())
            )  # fmt: skip
        for n in (0, 1, 2, 4, 5, 9):  # 503 was dropped on the way; 509 belongs to no part
            line.on_frame(
                Frame("st1", "cam0", n, np.zeros((8, 8), np.uint8), time.monotonic_ns(), now,
                      meta={"frame_id": 500 + n})
            )  # fmt: skip
        assert sub.wait_for(lambda ms: any(m.topic.endswith("/reject") for m in ms))
        assert sub.wait_for(lambda ms: any(b"unpaired_frames" in m.payload for m in ms), timeout=5)
    finally:
        line.stop()
        pub.stop()
    assert [(f.part_id, f.meta["frame_id"]) for f in paired] == [
        ("P-0", 500), ("P-1", 501), ("P-2", 502), ("P-4", 504), ("P-5", 505),
    ]  # fmt: skip
    (reject,) = sub.payloads("/reject")
    assert (reject["part_id"], reject["rule"]) == ("P-3", "error:no_frame")
    events = {e["event"]: e["data"] for e in sub.payloads("/events")}
    assert events["unpaired_frames"] == {"camera": "cam0", "count": 1}
    assert events["unpaired_announcements"] == {"camera": "cam0", "count": 1}
    stats = line.stats()["cam0"]
    assert (stats["paired"], stats["no_frame"], stats["unpaired_frames"]) == (5, 1, 1)
