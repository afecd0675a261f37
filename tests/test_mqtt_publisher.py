"""The MQTT publisher against a real Mosquitto: delivery, order, outages, restarts, status."""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from defectd.pipeline.inspection import Defect, Inspection, Verdict
from defectd.publish import MqttConfig, OutboxConfig, Publisher, StatusInfo
from defectd.publish.messages import schema_errors
from defectd.testing.mosquitto import Mosquitto
from defectd.testing.wait import wait_until
from publisher_support import PREFIX, make_publisher, started_publisher


def insp(seq: int, verdict: Verdict = Verdict.PASS, camera: str = "cam0") -> Inspection:
    defects = (Defect(40, (1, 2, 8, 5), (5.0, 4.5), 0.97, 0.8, 0.12),) if verdict == "fail" else ()
    return Inspection(
        "st1", camera, seq, verdict, defects, rule="area>=0.1mm2" if defects else None,
        t_grab_wall=time.time(),
    )  # fmt: skip


def seqs(collector: Any) -> list[int]:
    return [p["seq"] for p in collector.payloads("/result")]


def test_a_fail_is_published_as_result_and_reject_with_mqtt5_properties(
    mosquitto: Callable[..., Mosquitto], mqtt_collector: Callable[..., Any], tmp_path: Path
) -> None:
    sub, pub = started_publisher(mosquitto, mqtt_collector, tmp_path)
    try:
        item = insp(7, Verdict.FAIL)
        pub.submit(item)
        assert sub.wait_for(lambda ms: any(m.topic == f"{PREFIX}/st1/reject" for m in ms))
        assert sub.wait_for(lambda ms: any(m.topic == f"{PREFIX}/st1/cam0/result" for m in ms))
    finally:
        pub.stop()
    result = next(m for m in sub.messages if m.topic.endswith("/result"))
    assert result.qos == 1
    assert result.properties.ContentType == "application/json"
    assert ("result_id", item.result_id) in result.properties.UserProperty
    assert ("schema_version", "1") in result.properties.UserProperty
    (reject,) = sub.payloads("/reject")
    assert (reject["result_id"], reject["verdict"], reject["seq"]) == (item.result_id, "fail", 7)


def test_a_pass_gets_a_result_and_no_reject(
    mosquitto: Callable[..., Mosquitto], mqtt_collector: Callable[..., Any], tmp_path: Path
) -> None:
    sub, pub = started_publisher(mosquitto, mqtt_collector, tmp_path)
    pub.submit(insp(1))
    pub.submit(insp(2, Verdict.ERROR))
    assert sub.wait_for(lambda ms: len([m for m in ms if m.topic.endswith("t")]) >= 3)
    pub.stop()
    assert [p["seq"] for p in sub.payloads("/reject")] == [2]


def test_a_broker_down_at_start_is_not_fatal_and_results_arrive_in_order_once_it_runs(
    mosquitto: Callable[..., Mosquitto], mqtt_collector: Callable[..., Any], tmp_path: Path
) -> None:
    broker = mosquitto()
    sub = mqtt_collector(broker.host, broker.port, f"{PREFIX}/+/+/result", client_id="sub-a",
                         persistent=True)  # fmt: skip
    broker.stop()  # saves the subscriber's session
    pub = make_publisher(broker, tmp_path)
    pub.start()
    try:
        for i in range(50):
            pub.submit(insp(i))
        # The 50 commits can beat the publisher thread's first connection attempt.
        give_up = time.monotonic() + 5
        while pub.stats().last_error is None and time.monotonic() < give_up:
            time.sleep(0.01)
        stats = pub.stats()
        assert (stats.connected, stats.outbox_depth) == (False, 50)
        assert stats.last_error is not None
        broker.start()
        assert sub.wait_for(lambda ms: len(ms) >= 50, timeout=15)
    finally:
        pub.stop()
    assert seqs(sub) == list(range(50))
    assert pub.stats().outbox_depth == 0


def test_results_submitted_across_a_broker_sigkill_all_arrive(
    mosquitto: Callable[..., Mosquitto], mqtt_collector: Callable[..., Any], tmp_path: Path
) -> None:
    broker = mosquitto()
    sub = mqtt_collector(broker.host, broker.port, f"{PREFIX}/+/+/result", client_id="sub-b",
                         persistent=True)  # fmt: skip
    assert broker.wait_saved()  # the subscription must be on disk to survive the SIGKILL
    pub = make_publisher(broker, tmp_path)
    pub.start()
    try:
        for i in range(30):
            pub.submit(insp(i))
        assert sub.wait_for(lambda ms: len(ms) >= 30)
        broker.kill()
        for i in range(30, 60):
            pub.submit(insp(i))
        assert wait_until(lambda: not pub.stats().connected)
        broker.start()
        assert sub.wait_for(lambda ms: set(range(60)) <= {p["seq"] for p in sub.payloads("")},
                            timeout=15)  # fmt: skip
        assert wait_until(lambda: pub.stats().outbox_depth == 0)
    finally:
        pub.stop()
    assert pub.stats().connects == 2


def test_status_is_online_while_connected_and_offline_after_a_clean_stop(
    mosquitto: Callable[..., Mosquitto], mqtt_collector: Callable[..., Any], tmp_path: Path
) -> None:
    broker = mosquitto()
    pub = make_publisher(broker, tmp_path)
    pub.set_status(StatusInfo(version="1.2.3", model_name="m", model_sha256="a" * 64,
                              config_hash="c0ffee", cameras=("cam0", "cam1")))  # fmt: skip
    pub.start()
    assert wait_until(lambda: pub.stats().connected)
    online = mqtt_collector(broker.host, broker.port, f"{PREFIX}/st1/status")
    assert online.wait_for(lambda ms: len(ms) >= 1)
    pub.stop()
    after = mqtt_collector(broker.host, broker.port, f"{PREFIX}/st1/status")
    assert after.wait_for(lambda ms: len(ms) >= 1)
    (first,) = online.payloads("status")[:1]
    assert (first["state"], first["cameras"], first["config_hash"]) == (
        "online", ["cam0", "cam1"], "c0ffee",
    )  # fmt: skip
    retained = after.messages[0]
    assert retained.retain
    payload = after.payloads("status")[0]
    assert (payload["state"], payload["reason"]) == ("offline", "stopped")


PRODUCER = textwrap.dedent(
    """
    import sys, time
    from defectd.log import configure_logging
    from defectd.pipeline.inspection import Inspection, Verdict
    from defectd.publish import MqttConfig, OutboxConfig, Publisher

    configure_logging("warning")
    host, port, outbox, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    config = MqttConfig(host=host, port=port, topic_prefix="t", reconnect_min_s=0.1)
    pub = Publisher(config, OutboxConfig(path=outbox), "st1")
    pub.start()
    for i in range(n):
        pub.submit(Inspection("st1", "cam0", i, Verdict.PASS, t_grab_wall=time.time()))
    print("submitted", flush=True)
    while not pub.stats().connected:
        time.sleep(0.01)
    print("connected", flush=True)
    time.sleep(120)
    """
)


def start_producer(broker: Mosquitto, outbox: Path, n: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", PRODUCER, broker.host, str(broker.port), str(outbox), str(n)],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_status_is_offline_after_the_publishing_process_is_killed(
    mosquitto: Callable[..., Mosquitto], mqtt_collector: Callable[..., Any], tmp_path: Path
) -> None:
    broker = mosquitto()
    proc = start_producer(broker, tmp_path / "outbox.sqlite", 0)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "submitted"
        assert proc.stdout.readline().strip() == "connected"
        online = mqtt_collector(broker.host, broker.port, f"{PREFIX}/st1/status")
        assert online.wait_for(lambda ms: len(ms) >= 1)
        proc.send_signal(signal.SIGKILL)
        assert online.wait_for(lambda ms: len(ms) >= 2)
    finally:
        proc.kill()
        proc.wait()
    states = [p["state"] for p in online.payloads("status")]
    assert states == ["online", "offline"]
    will = online.payloads("status")[1]
    assert will["reason"] == "connection_lost"
    assert schema_errors("status", will) == []
    retained = mqtt_collector(broker.host, broker.port, f"{PREFIX}/st1/status")
    assert retained.wait_for(lambda ms: len(ms) >= 1)
    assert retained.payloads("status")[0]["state"] == "offline"


def test_rows_left_by_a_killed_process_are_published_in_order_after_a_restart(
    mosquitto: Callable[..., Mosquitto], mqtt_collector: Callable[..., Any], tmp_path: Path
) -> None:
    broker = mosquitto()
    sub = mqtt_collector(broker.host, broker.port, f"{PREFIX}/+/+/result", client_id="sub-c",
                         persistent=True)  # fmt: skip
    broker.stop()
    outbox = tmp_path / "outbox.sqlite"
    proc = start_producer(broker, outbox, 40)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "submitted"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    broker.start()
    pub = make_publisher(broker, tmp_path)
    pub.start()
    try:
        assert sub.wait_for(lambda ms: len(ms) >= 40, timeout=15)
    finally:
        pub.stop()
    assert seqs(sub) == list(range(40))


def test_an_acl_denial_is_an_error_naming_the_reason_code_and_the_row_is_kept(
    mosquitto: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite {PREFIX}/st1/status\ntopic readwrite {PREFIX}/st1/events\n")
    broker = mosquitto(extra_conf=f"acl_file {acl}")
    pub = make_publisher(broker, tmp_path)
    with capture_logs() as logs:
        pub.start()
        pub.submit(insp(1))
        assert wait_until(lambda: pub.stats().refused >= 1)
        pub.stop(drain_timeout_s=0.2)
    (refusal,) = [e for e in logs if e["event"] == "publish_refused"]
    assert refusal["log_level"] == "error"
    assert (refusal["reason_code"], refusal["reason"]) == (135, "Not authorized")
    assert refusal["topic"] == f"{PREFIX}/st1/cam0/result"
    assert pub.stats().outbox_depth == 1
    assert pub.stats().refused == 1


def test_mqtt_3_1_1_delivers_results(
    mosquitto: Callable[..., Mosquitto], mqtt_collector: Callable[..., Any], tmp_path: Path
) -> None:
    broker = mosquitto()
    sub = mqtt_collector(broker.host, broker.port, f"{PREFIX}/+/+/result")
    pub = make_publisher(broker, tmp_path, protocol="3.1.1")
    pub.start()
    for i in range(5):
        pub.submit(insp(i))
    assert sub.wait_for(lambda ms: len(ms) >= 5)
    pub.stop()
    assert seqs(sub) == list(range(5))


def test_submit_returns_in_well_under_a_millisecond(
    mosquitto: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    broker = mosquitto()
    pub = make_publisher(broker, tmp_path)
    pub.start()
    times = []
    try:
        for i in range(300):
            item = insp(i, Verdict.FAIL if i % 10 == 0 else Verdict.PASS)
            t0 = time.perf_counter()
            pub.submit(item)
            times.append(time.perf_counter() - t0)
            time.sleep(0.001)
    finally:
        pub.stop()
    assert statistics.median(times) < 1e-3
    assert pub.stats().acked == 330


def test_submit_before_start_is_a_clear_error(tmp_path: Path) -> None:
    from defectd.errors import PublishError

    pub = Publisher(MqttConfig(), OutboxConfig(path=tmp_path / "o.sqlite"), "st1")
    with pytest.raises(PublishError, match="not started"):
        pub.submit(insp(1))
