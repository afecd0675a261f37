"""A station that cannot lie: a verdict that cannot be stored durably becomes a fail-safe
reject sent directly (``not_durable``), raises an alarm, makes the station not ready and
withholds the systemd watchdog; a hung broker shows as not ready."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from defectd.daemon.config import DaemonSection, load_station_config
from defectd.daemon.health_report import HealthInputs, check_progress, health_report
from defectd.daemon.routing import ProgressSnapshot
from defectd.daemon.sdnotify import SdNotifier
from defectd.daemon.service import Service
from defectd.errors import PublishError
from defectd.pipeline.inspection import Inspection, Verdict
from defectd.publish import MqttConfig, OutboxConfig, Publisher
from defectd.publish.failsafe import NotDurableError
from defectd.publish.messages import schema_errors
from defectd.publish.mqtt import PublisherStats
from defectd.publish.outbox import OutboxDamagedError
from defectd.testing.disk import FullDisk
from defectd.testing.mosquitto import Mosquitto
from defectd.testing.notify import NotifySocket
from defectd.testing.wait import wait_until

# -- the health rules ----------------------------------------------------------------------


def _stats(**changes: Any) -> PublisherStats:
    base = PublisherStats(
        connected=True, outbox_depth=0, oldest_age_s=None, submitted=10, published=10,
        acked=10, dropped=0, dropped_rejects=0, refused=0, inflight=0, connects=1,
        connect_failures=0, near_bound=False, near_bound_warnings=0, last_error=None,
        ack_latency_ms_p50=1.0, ack_latency_ms_p99=2.0,
    )  # fmt: skip
    return replace(base, **changes)


def _inputs(publisher: PublisherStats) -> HealthInputs:
    return HealthInputs(
        now=100.0,
        started=0.0,
        ready=True,
        shutting_down=False,
        progress=ProgressSnapshot(submitted=50, results=50, inspected=50, last_inspected=99.9),
        sources=[],
        publisher=publisher,
        engine=None,
        reloads=0,
        daemon=DaemonSection(max_result_age_s=10.0),
    )


def test_verdicts_that_cannot_be_stored_stop_readiness_and_the_watchdog() -> None:
    failing = _stats(store_failing=True, store_error="disk full", not_durable=3)
    live, why = check_progress(_inputs(failing))
    assert not live
    assert "not stored durably (disk full); 3 were sent directly" in why
    report = health_report(_inputs(failing))
    assert not report.ready and why in report.reasons


def test_a_damaged_outbox_stops_readiness_and_the_watchdog() -> None:
    damaged = _stats(outbox_fault="damaged", outbox_fault_detail="row 7 fails its checksum")
    assert check_progress(_inputs(damaged)) == (
        False,
        "the outbox is damaged: row 7 fails its checksum",
    )


def test_a_hung_broker_is_not_ready_once_the_oldest_result_waits_too_long() -> None:
    assert health_report(_inputs(_stats(oldest_result_age_s=9.0))).ready
    hung = health_report(_inputs(_stats(oldest_result_age_s=12.0, outbox_depth=540)))
    assert hung.live and not hung.ready
    assert hung.reasons == (
        "oldest unacknowledged result is 12 s old (limit 10 s): the broker is hung or slow",
    )
    assert hung.checks["outbox"]["oldest_result_age_s"] == 12.0


def test_an_outbox_fault_without_lost_verdicts_is_not_ready_but_live() -> None:
    report = health_report(_inputs(_stats(outbox_fault="io", outbox_fault_detail="ack failed")))
    assert report.live and not report.ready
    assert report.reasons == ("outbox fault io: ack failed",)


# -- the publisher's fail-safe path ----------------------------------------------------------


def _insp(seq: int, verdict: Verdict) -> Inspection:
    return Inspection("st1", "cam0", seq, verdict, rule=None, t_grab_wall=time.time())


def test_a_verdict_the_outbox_refuses_is_sent_directly_as_a_not_durable_reject(
    mosquitto: Callable[..., Mosquitto],
    mqtt_collector: Callable[..., Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = mosquitto()
    sub = mqtt_collector(broker.host, broker.port, "fs/#")
    config = MqttConfig(host=broker.host, port=broker.port, topic_prefix="fs")
    pub = Publisher(config, OutboxConfig(path=tmp_path / "outbox.sqlite"), "st1")
    pub.start()
    try:
        assert pub._outbox is not None
        real_put = pub._outbox.put_many

        def disk_full(rows: Any) -> Any:
            raise PublishError("outbox x: cannot store a message: database or disk is full")

        monkeypatch.setattr(pub._outbox, "put_many", disk_full)
        passed = _insp(1, Verdict.PASS)
        with pytest.raises(NotDurableError, match="not stored durably"):
            pub.submit(passed)
        assert sub.wait_for(lambda ms: len([m for m in ms if "/events" in m.topic]) >= 1)
        assert sub.wait_for(lambda ms: len(ms) >= 3)
        reject = sub.payloads("/reject")[0]
        result = sub.payloads("/result")[0]
        for kind, msg in (("reject", reject), ("result", result)):
            assert schema_errors(kind, msg) == []
            assert msg["not_durable"] is True
            assert (msg["result_id"], msg["verdict"]) == (passed.result_id, "error")
            assert msg["rule"] == "error:not_durable"
        alarm = sub.payloads("/events")[0]
        assert (alarm["event"], alarm["severity"]) == ("outbox_store_failed", "error")
        stats = pub.stats()
        assert (stats.store_failing, stats.not_durable) == (True, 1)
        assert "disk is full" in (stats.store_error or "")

        monkeypatch.setattr(pub._outbox, "put_many", real_put)
        pub.submit(_insp(2, Verdict.PASS))
        assert not pub.stats().store_failing
        assert sub.wait_for(
            lambda ms: any(b"outbox_store_recovered" in m.payload for m in ms), timeout=10
        )
    finally:
        pub.stop(drain_timeout_s=2.0)


def test_a_frozen_broker_shows_as_the_age_of_the_oldest_unacknowledged_result(
    mosquitto: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    broker = mosquitto()
    config = MqttConfig(host=broker.host, port=broker.port, topic_prefix="hung")
    pub = Publisher(config, OutboxConfig(path=tmp_path / "outbox.sqlite"), "st1")
    pub.start()
    assert broker.pid is not None
    try:
        assert wait_until(lambda: pub.stats().connected, 10)
        pub.submit(_insp(0, Verdict.PASS))
        assert wait_until(lambda: pub.stats().outbox_depth == 0, 10)
        assert pub.stats().oldest_result_age_s is None
        os.kill(broker.pid, signal.SIGSTOP)  # accepts nothing, acknowledges nothing
        for seq in range(1, 6):
            pub.submit(_insp(seq, Verdict.FAIL))
        time.sleep(2.5)
        stats = pub.stats()
        assert stats.connected  # the TCP connection looks fine
        assert stats.oldest_result_age_s is not None and stats.oldest_result_age_s >= 2.0
        inputs = replace(_inputs(stats), daemon=DaemonSection(max_result_age_s=2.0))
        report = health_report(inputs)
        assert report.live and not report.ready
        assert any("broker is hung or slow" in r for r in report.reasons)
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    try:
        assert wait_until(lambda: pub.stats().outbox_depth == 0, 20)
        assert pub.stats().oldest_result_age_s is None
    finally:
        pub.stop(drain_timeout_s=2.0)


# -- the daemon: a full state disk -----------------------------------------------------------


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def test_a_full_state_disk_turns_the_station_not_ready_withholds_the_watchdog_and_heals(  # noqa: PLR0917
    tmpfs: Callable[[int], Path],
    mosquitto: Callable[..., Mosquitto],
    mqtt_collector: Callable[..., Any],
    notify: NotifySocket,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    state = tmpfs(2 * 1024 * 1024)
    broker = mosquitto()
    sub = mqtt_collector(broker.host, broker.port, "dur/#")
    path = tmp_path / "station.toml"
    path.write_text(
        f'station = "st9"\n[model]\npath = "{tiny_model}"\nbackend = "ort"\nthreads = 1\n'
        f'warmup = 1\ncache_dir = "{tmp_path / "cache"}"\n'
        '[[cameras]]\ntype = "synthetic"\ncamera = "cam0"\nrate_hz = 20\nheight = 64\n'
        "width = 64\n"
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\ntopic_prefix = "dur"\n'
        "reconnect_min_s = 0.1\nreconnect_max_s = 0.5\n"
        "[outbox]\nreserve_bytes = 131072\n"
        "[archive]\nenabled = false\n[health]\nenabled = false\n"
        f'[daemon]\nstate_dir = "{state}"\ndrain_timeout_s = 2\n'
    )
    notifier = SdNotifier({"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"})
    service = Service(load_station_config(path), notifier=notifier, install_signals=False)
    thread = threading.Thread(target=service.serve, name="test-service")
    thread.start()
    disk = FullDisk(state / "filler", retry_s=0.01, name="test-filler")
    try:
        assert wait_until(lambda: service.ready and notify.pings_since(0) > 0, 60)
        assert service.health_report().ready

        disk.start()
        assert wait_until(lambda: not service.health_report().live, 20)
        report = service.health_report()
        assert not report.ready
        assert any("not stored durably" in r for r in report.reasons)
        t_failed = time.monotonic()
        time.sleep(1.0)  # two watchdog intervals
        assert notify.pings_since(t_failed) == 0
        assert wait_until(lambda: any(p.get("not_durable") for p in sub.payloads("/reject")), 20)
        events = [p["event"] for p in sub.payloads("/events")]
        assert "outbox_store_failed" in events
        assert any("not stored durably" in line for _, line in notify.lines)  # STATUS=

        disk.stop()  # space is freed: no restart needed
        assert wait_until(lambda: service.health_report().live, 20)
        t_healed = time.monotonic()
        assert wait_until(lambda: notify.pings_since(t_healed) > 0, 20)
        assert wait_until(
            lambda: "outbox_store_recovered" in [p["event"] for p in sub.payloads("/events")], 20
        )
    finally:
        disk.stop()
        service.should_exit = True
        thread.join(30)
    assert not thread.is_alive()


def test_a_damaged_outbox_stops_the_daemon_before_its_model_loads(
    tiny_model: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "outbox.sqlite").write_bytes(b"")  # what a crash or a bad copy can leave
    path = tmp_path / "station.toml"
    path.write_text(
        f'station = "st9"\n[model]\npath = "{tiny_model}"\nbackend = "ort"\n'
        '[[cameras]]\ntype = "synthetic"\ncamera = "cam0"\n[mqtt]\nport = 1\n'
        f'[archive]\nenabled = false\n[health]\nenabled = false\n[daemon]\nstate_dir = "{state}"\n'
    )
    opened: list[object] = []

    def opener(*args: Any, **kwargs: Any) -> Any:
        opened.append(args)
        raise AssertionError("the model must not load on a damaged outbox")

    service = Service(
        load_station_config(path), notifier=SdNotifier({}), engine_opener=opener,
        install_signals=False,
    )  # fmt: skip
    with pytest.raises(OutboxDamagedError, match=r"outbox .*outbox.sqlite is damaged"):
        service.serve()
    assert opened == []
    assert (state / "outbox.sqlite").stat().st_size == 0  # kept as it was
