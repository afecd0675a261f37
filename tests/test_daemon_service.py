"""The service in this process: start-up errors, reload rules, archive wiring, bad reloads."""

from __future__ import annotations

import csv
import json
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from defectd.cli import main
from defectd.daemon.config import load_station_config
from defectd.daemon.reload import merge_reload
from defectd.daemon.sdnotify import SdNotifier
from defectd.daemon.service import Service
from defectd.model.card import card_path
from station_support import NO_BROKER_NO_HEALTH, serving, synthetic_station


def _config_text(model: Path, state: Path, *, rate: str = "20", extra: str = "") -> str:
    return f"""
{synthetic_station("st2", model)}
rate_hz = {rate}
height = 64
width = 64
defect_rate = 0.5
{NO_BROKER_NO_HEALTH}
[archive]
pass_sample = 1.0
[daemon]
state_dir = "{state}"
drain_timeout_s = 1
{extra}
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_malformed_config_exits_2_naming_the_key(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _write(tmp_path / "bad.toml", _config_text(tiny_model, tmp_path, rate="0"))
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {cfg}: cameras.0.rate_hz: Input should be greater than 0"


def test_missing_model_file_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _write(tmp_path / "s.toml", _config_text(tmp_path / "gone.onnx", tmp_path))
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"model.path: model file not found: {tmp_path / 'gone.onnx'}" in err


def test_model_without_card_exits_2_naming_the_card(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "nocard.onnx"
    shutil.copy(tiny_model, model)
    cfg = _write(tmp_path / "s.toml", _config_text(model, tmp_path / "state"))
    assert main(["run", "--config", str(cfg)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "nocard.card.json: model card not found" in last


def test_reload_applies_model_and_rules_but_not_the_broker(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    old = load_station_config(_write(tmp_path / "a.toml", _config_text(model, tmp_path)), env={})
    text = _config_text(model, tmp_path, extra="").replace("port = 1\n", "port = 2\n")
    text += '[rules]\nrules = [{ kind = "count", max_defects = 2 }]\n'
    new = load_station_config(_write(tmp_path / "b.toml", text), env={})
    merged, ignored = merge_reload(old, new)
    assert ignored == ["mqtt"]
    assert merged.mqtt.port == 1
    assert merged.rules == new.rules


@pytest.fixture
def running(tmp_path: Path, tiny_model: Path) -> Iterator[tuple[Service, Path]]:
    """A service on a thread (no signals), broker unreachable (results queue)."""
    live = tmp_path / "model.onnx"
    shutil.copy(tiny_model, live)
    shutil.copy(card_path(tiny_model), card_path(live))
    path = _write(tmp_path / "station.toml", _config_text(live, tmp_path / "state"))
    service = Service(
        load_station_config(path), config_path=path, notifier=SdNotifier({}), install_signals=False
    )
    with serving(service, lambda: service.ready, stop_s=20):
        yield service, path


def _wait(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_bad_config_on_reload_keeps_the_running_station(running: tuple[Service, Path]) -> None:
    service, path = running
    path.write_text(path.read_text().replace("rate_hz = 20", "rate_hz = -5"))
    before = service.metrics.verdicts.value(camera="cam0", verdict="pass") + (
        service.metrics.verdicts.value(camera="cam0", verdict="fail")
    )
    service.request_reload()
    _wait(lambda: service.metrics.reloads.value(result="failed") == 1)
    assert service.metrics.reloads.value(result="ok") == 0
    _wait(
        lambda: (
            service.metrics.verdicts.value(camera="cam0", verdict="pass")
            + service.metrics.verdicts.value(camera="cam0", verdict="fail")
            > before + 5
        )
    )
    assert service.progress()[0]


def test_daemon_archives_parts_as_a_dataset(running: tuple[Service, Path]) -> None:
    service, _ = running
    archive = service.config.archive.dir
    manifest = archive / "manifest.csv"
    _wait(lambda: manifest.exists() and len(manifest.read_text().splitlines()) > 5)
    with (archive / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["cls"] for r in rows} - {"error"}  # inspected parts, labelled
    assert all((archive / r["image"]).is_file() for r in rows)


def test_batch_run_exits_when_its_source_ends_with_every_result_in_the_ledger(
    tmp_path: Path, tiny_model: Path
) -> None:
    extra = 'exit_when_sources_end = true\nresult_ledger = "ledger.txt"'
    text = _config_text(tiny_model, tmp_path / "state", extra=extra)
    text = text.replace("defect_rate = 0.5", "defect_rate = 0.5\ncount = 12")
    cfg = load_station_config(_write(tmp_path / "batch.toml", text))
    service = Service(cfg, notifier=SdNotifier({}), install_signals=False)
    assert service.serve() == 0  # returns by itself once the 12 parts are inspected
    ledger = (tmp_path / "state" / "ledger.txt").read_text().split()
    assert len(ledger) == len(set(ledger)) == 12


# Every family the station exposed before /metrics moved to prometheus-client, with its type:
# dashboards and alerts are written against these names.
METRIC_FAMILIES = {
    "defectd_frames_total": "counter",
    "defectd_verdicts_total": "counter",
    "defectd_errors_total": "counter",
    "defectd_stage_latency_ms": "histogram",
    "defectd_outbox_commit_ms": "histogram",
    "defectd_queue_depth": "gauge",
    "defectd_queue_capacity": "gauge",
    "defectd_frames_in_flight": "gauge",
    "defectd_fps": "gauge",
    "defectd_outbox_depth": "gauge",
    "defectd_outbox_oldest_age_seconds": "gauge",
    "defectd_outbox_near_bound": "gauge",
    "defectd_broker_connected": "gauge",
    "defectd_published_total": "counter",
    "defectd_acked_total": "counter",
    "defectd_outbox_dropped_total": "counter",
    "defectd_mqtt_client_id_clashes_total": "counter",
    "defectd_ack_latency_ms": "gauge",
    "defectd_camera_state": "gauge",
    "defectd_camera_fps": "gauge",
    "defectd_camera_frames_lost_total": "counter",
    "defectd_camera_reconnects_total": "counter",
    "defectd_camera_events_total": "counter",
    "defectd_engine_info": "gauge",
    "defectd_reloads_total": "counter",
    "defectd_archive_written_total": "counter",
    "defectd_archive_skipped_total": "counter",
    "defectd_archive_bytes": "gauge",
    "defectd_ready": "gauge",
    "defectd_last_progress_age_seconds": "gauge",
    "defectd_log_suppressed_total": "counter",
    # Added with the durability checks (docs/daemon.md, "When storage or the broker fails").
    "defectd_results_not_durable_total": "counter",
    "defectd_outbox_oldest_result_age_seconds": "gauge",
    "defectd_outbox_store_failing": "gauge",
    "defectd_outbox_fault": "gauge",
    "defectd_disk_free_bytes": "gauge",
    # Added with the OPC UA server (docs/opcua.md; zero while [opcua] is off).
    "defectd_opcua_events_total": "counter",
    "defectd_opcua_dropped_total": "counter",
    "defectd_opcua_refused_sessions_total": "counter",
    # Added with drift monitoring (docs/lifecycle.md; per camera once it has parts).
    "defectd_drift_score": "gauge",
    "defectd_drift_level": "gauge",
    "defectd_drift_alarm": "gauge",
    "defectd_drift_learning": "gauge",
    "defectd_drift_alarms_total": "counter",
}


def test_metrics_endpoint_keeps_every_metric_name_and_parses(
    tmp_path: Path, tiny_model: Path
) -> None:
    text = _config_text(tiny_model, tmp_path / "state").replace(
        "enabled = false", 'address = "127.0.0.1:0"'
    )
    service = Service(
        load_station_config(_write(tmp_path / "s.toml", text)),
        notifier=SdNotifier({}),
        install_signals=False,
    )
    thread = threading.Thread(target=service.serve, name="test-service")
    thread.start()
    try:
        _wait(lambda: service.ready, timeout=30)
        assert service.http_url is not None
        with urllib.request.urlopen(service.http_url + "/metrics", timeout=5) as resp:
            assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            body = resp.read().decode()
        with urllib.request.urlopen(service.http_url + "/livez", timeout=5) as resp:
            assert json.loads(resp.read()) == {"live": True}
    finally:
        service.should_exit = True
        thread.join(20)
    families = {
        f.name + ("_total" if f.type == "counter" else ""): f
        for f in text_string_to_metric_families(body)
    }
    assert {name: f.type for name, f in families.items()} == METRIC_FAMILIES
    verdicts = families["defectd_verdicts_total"].samples
    assert sum(s.value for s in verdicts if s.labels["camera"] == "cam0") > 0
    engine = families["defectd_engine_info"].samples
    assert [s.labels["model"] for s in engine] == ["tiny"]
    buckets = [
        s for s in families["defectd_stage_latency_ms"].samples if s.name.endswith("_bucket")
    ]
    assert {s.labels["stage"] for s in buckets} >= {"total"}
