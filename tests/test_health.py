"""The health and metrics endpoint: JSON readiness with reasons, Prometheus text exposition."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from defectd.daemon.health import HealthReport, HealthServer, parse_address
from defectd.daemon.metrics import CONTENT_TYPE, Registry
from defectd.errors import ConfigError

Served = tuple[HealthServer, dict[str, HealthReport], Registry]


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, as the Prometheus text parser reads it."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def served() -> Iterator[Served]:
    state = {"report": HealthReport(live=True, ready=False, reasons=("no frames yet",))}
    registry = Registry()
    server = HealthServer("127.0.0.1:0", lambda: state["report"], registry.render)
    server.start()
    yield server, state, registry
    server.stop()


def test_healthz_is_503_with_reasons_until_ready(served: Served) -> None:
    server, state, _ = served
    host, port = server.address
    status, ctype, body = _get(f"http://{host}:{port}/healthz")
    assert status == 503
    assert ctype == "application/json"
    assert json.loads(body)["reasons"] == ["no frames yet"]
    state["report"] = HealthReport(live=True, ready=True, checks={"engine": {"ok": True}})
    status, _, body = _get(f"http://{host}:{port}/healthz")
    assert status == 200
    assert json.loads(body) == {
        "live": True,
        "ready": True,
        "reasons": [],
        "checks": {"engine": {"ok": True}},
    }


def test_metrics_endpoint_serves_prometheus_text(served: Served) -> None:
    server, _, registry = served
    frames = registry.counter("defectd_frames_total", "Frames grabbed.", ["camera"])
    frames.inc(camera="cam0")
    frames.inc(2, camera="cam0")
    host, port = server.address
    status, ctype, body = _get(f"http://{host}:{port}/metrics")
    assert status == 200
    assert ctype == CONTENT_TYPE
    assert _samples(body)[("defectd_frames_total", (("camera", "cam0"),))] == 3
    assert "# TYPE defectd_frames_total counter" in body


def test_unknown_path_is_404(served: Served) -> None:
    server, _, _ = served
    host, port = server.address
    assert _get(f"http://{host}:{port}/nope")[0] == 404


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    registry = Registry()
    hist = registry.histogram("lat_ms", "Latency.", ["stage"], buckets=(1, 10))
    for value in (0.5, 5, 50):
        hist.observe(value, stage="infer")
    samples = _samples(registry.render())
    assert samples[("lat_ms_bucket", (("le", "1.0"), ("stage", "infer")))] == 1
    assert samples[("lat_ms_bucket", (("le", "10.0"), ("stage", "infer")))] == 2
    assert samples[("lat_ms_bucket", (("le", "+Inf"), ("stage", "infer")))] == 3
    assert samples[("lat_ms_sum", (("stage", "infer"),))] == 55.5
    assert samples[("lat_ms_count", (("stage", "infer"),))] == 3


def test_label_values_are_escaped() -> None:
    registry = Registry()
    registry.gauge("g", "A gauge.", ["name"]).set(1, name='a"b\\c\nd')
    assert 'g{name="a\\"b\\\\c\\nd"} 1' in registry.render()


def test_collectors_refresh_gauges_at_scrape_time() -> None:
    registry = Registry()
    depth = registry.gauge("depth", "Queue depth.")
    source = {"depth": 3}
    registry.add_collector(lambda: depth.set(source["depth"]))
    assert _samples(registry.render())[("depth", ())] == 3
    source["depth"] = 7
    assert _samples(registry.render())[("depth", ())] == 7


def test_wrong_labels_are_refused() -> None:
    counter = Registry().counter("c_total", "C.", ["camera"])
    with pytest.raises(ValueError, match="takes labels"):
        counter.inc(station="x")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:80", ("::1", 80)), (":9", ("0.0.0.0", 9))],
)
def test_address_parsing(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


def test_bad_address_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"health\.address: 'localhost' is not HOST:PORT"):
        parse_address("localhost")


def test_busy_port_is_a_clear_error(served: Served) -> None:
    server, _, _ = served
    host, port = server.address
    with pytest.raises(ConfigError, match=f"cannot listen on {host}:{port}"):
        HealthServer(f"{host}:{port}", lambda: HealthReport(True, True), str)
