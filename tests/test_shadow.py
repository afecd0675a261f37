"""Shadow mode: a candidate model beside the live one, compared part by part, never in its way.

Two real ONNX models on ONNX Runtime make the verdicts known in advance: the live model marks
pixels brighter than 0.5 (of full scale), the candidate those brighter than 0.3, so a part with
a dim spot is a disagreement (live pass, shadow fail), a bright spot fails on both and a plain
part passes on both.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from defectd.cli import main
from defectd.daemon.config import StationConfig, load_station_config
from defectd.daemon.metrics import Registry
from defectd.daemon.sdnotify import SdNotifier
from defectd.daemon.service import Service
from defectd.daemon.shadow.runner import ShadowRunner, mask_iou
from defectd.daemon.shadow.store import ModelRef, shadow_report
from defectd.daemon.station import camera_setups
from defectd.engines import open_engine
from defectd.engines.base import Engine
from defectd.model.card import card_path, file_sha256
from defectd.pipeline.frame import Frame
from defectd.pipeline.runner import Pipeline, PipelineResult
from defectd.publish.messages import schema_errors
from pipeline_support import brightness_model
from station_support import (
    EVERY_FRAME,
    NO_BROKER_NO_HEALTH,
    NO_HEALTH_NO_ARCHIVE,
    copy_model,
    synthetic_station,
)

SIZE = 64
DARK, DIM, BRIGHT = 40, 110, 220  # live sees BRIGHT only; the candidate DIM too


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("shadow_models")
    live, candidate = folder / "live" / "model.onnx", folder / "candidate" / "model.onnx"
    brightness_model(live, level=0.5)
    brightness_model(candidate, level=0.3)
    return live, candidate


def _station(
    tmp: Path, live: Path, shadow: str, *, camera: str = "", pipeline: str = ""
) -> StationConfig:
    text = f"""
{synthetic_station("sh1", live)}
height = {SIZE}
width = {SIZE}
{camera}
{EVERY_FRAME}
max_batch = 1
{pipeline}
{NO_BROKER_NO_HEALTH}
[daemon]
state_dir = "{tmp / "state"}"
[shadow]
{shadow}
"""
    path = tmp / "station.toml"
    path.write_text(text)
    return load_station_config(path, env={})


def _frame(seq: int, spot: int | None, *, truth: bool = True) -> Frame:
    image = np.full((SIZE, SIZE), DARK, np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    if spot is not None:
        image[20:30, 24:36] = spot
        mask[20:30, 24:36] = 1
    meta: dict[str, Any] = {}
    if truth:
        meta = {
            "truth_mask": mask,
            "truth_defective": spot is not None,
            "truth_kinds": ("spot",) if spot is not None else (),
        }
    return Frame(
        "sh1", "cam0", seq, image, time.monotonic_ns(), time.time(), part_id=f"P{seq}", meta=meta
    )


class _Line:
    """The live pipeline of ``config`` whose results go to ``observe`` (and are kept)."""

    def __init__(self, config: StationConfig, observe: Callable[[PipelineResult], None]) -> None:
        m = config.model
        self.engine = open_engine(m.path, backend="ort", threads=1, max_batch=1)
        from defectd.model.card import load_card

        self.results: list[PipelineResult] = []
        self._observe = observe
        self.pipeline = Pipeline(
            self.engine,
            load_card(m.path),
            config.pipeline,
            on_result=self._sink,
            postprocess=config.postprocess,
            rules=config.rules,
            cameras=camera_setups(config),
            model_sha256=file_sha256(m.path),
        )
        self.pipeline.start()

    def _sink(self, result: PipelineResult) -> None:
        self.results.append(result)
        self._observe(result)

    def close(self) -> None:
        self.pipeline.stop(5.0)
        self.engine.close()


def _live_ref(config: StationConfig) -> ModelRef:
    return ModelRef("brightness", file_sha256(config.model.path))


def _wait(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --------------------------------------------------------------------------- config check


def test_config_check_names_the_shadow_keys(
    tmp_path: Path, models: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    live, candidate = models
    gone = tmp_path / "gone.onnx"
    for shadow, expected in (
        (f'path = "{gone}"', f"shadow.path: model file not found: {gone}"),
        (f'path = "{candidate}"\nbackend = "nope"', "shadow.backend: unknown backend 'nope'"),
        (f'path = "{candidate}"\nqueue = 0', "shadow.queue: Input should be greater than"),
    ):
        cfg = tmp_path / "s.toml"
        text = f'station = "sh1"\n[model]\npath = "{live}"\nbackend = "ort"\n'
        text += f'[[cameras]]\ntype = "synthetic"\ncamera = "cam0"\n[shadow]\n{shadow}\n'
        cfg.write_text(text)
        assert main(["config", "check", str(cfg)]) == 2
        assert expected in capsys.readouterr().err

    # A calibration file calibrated for another model: named at the pre-flight check.
    from defectd.calibration.file import ThresholdSection, ThresholdTarget, update_calibration

    cal = tmp_path / "cand.cal.json"
    update_calibration(
        cal,
        threshold=ThresholdSection(
            pixel_threshold=0.4,
            target=ThresholdTarget(escape_rate=0.01),
            model_sha256=file_sha256(live),
        ),
    )
    config = _station(tmp_path, live, f'path = "{candidate}"\ncalibration = "{cal}"')
    assert config.source_path is not None
    assert main(["config", "check", str(config.source_path)]) == 2
    err = capsys.readouterr().err
    assert "shadow.calibration: " in err and "not the candidate" in err


# --------------------------------------------------------------------------- comparing


@pytest.fixture
def compared(
    tmp_path: Path, models: tuple[Path, Path]
) -> Iterator[tuple[StationConfig, list[PipelineResult], list[dict[str, Any]], Registry]]:
    """Six parts through the live line with a candidate in shadow; stopped, record closed."""
    live, candidate = models
    config = _station(tmp_path, live, f'path = "{candidate}"\nbackend = "ort"\nqueue = 16')
    published: list[dict[str, Any]] = []
    registry = Registry()
    runner = ShadowRunner(config, registry=registry, publish=published.append)
    runner.start(_live_ref(config))
    line = _Line(config, runner.observe)
    try:
        spots = [None, DIM, BRIGHT, DIM, None, BRIGHT]
        for seq, spot in enumerate(spots):
            line.pipeline.submit(_frame(seq, spot, truth=seq != 4))
        assert line.pipeline.wait_idle(20)
        _wait(lambda: runner.summary()["parts"] == len(spots))
    finally:
        line.close()
        runner.stop(10.0)
    yield config, line.results, published, registry


def test_disagreements_are_archived_with_image_and_both_masks(
    compared: tuple[StationConfig, list[PipelineResult], list[dict[str, Any]], Registry],
) -> None:
    config, live_results, _, _ = compared
    folders = sorted((config.state_dir / "shadow" / "disagreements").iterdir())
    assert len(folders) == 2  # the two dim spots
    by_seq = {r.inspection.seq: r for r in live_results}
    for folder in folders:
        record = json.loads((folder / "record.json").read_text())
        assert record["live"]["verdict"] == "pass" and record["shadow"]["verdict"] == "fail"
        assert record["truth"] == "fail" and record["truth_kinds"] == ["spot"]
        live = by_seq[record["seq"]]
        assert live.mask is not None
        image = cv2.imread(str(folder / "image.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(image, live.frame.image)
        live_mask = cv2.imread(str(folder / "live_mask.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(live_mask, live.mask * 255)
        assert not live_mask.any()
        shadow_mask = cv2.imread(str(folder / "shadow_mask.png"), cv2.IMREAD_UNCHANGED) // 255
        truth = cv2.imread(str(folder / "truth_mask.png"), cv2.IMREAD_UNCHANGED) // 255
        np.testing.assert_array_equal(truth, live.frame.meta["truth_mask"])
        # The candidate found the dim spot (its 3x3 mean blurs the edges by a pixel).
        assert mask_iou(shadow_mask.astype(np.uint8), truth.astype(np.uint8)) > 0.7
        overlay = cv2.imread(str(folder / "overlay.png"))
        assert overlay.shape == (SIZE, 2 * SIZE, 3)
        assert record["iou"] == 0.0  # an empty live mask against the shadow's spot


def test_report_summarises_parts_confusion_and_disagreements(
    compared: tuple[StationConfig, list[PipelineResult], list[dict[str, Any]], Registry],
    models: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    config, _, _, _ = compared
    live, candidate = models
    report = shadow_report(config.state_dir)
    assert report["live"] == {"sha256": file_sha256(live), "name": "brightness"}
    assert report["candidate"]["sha256"] == file_sha256(candidate)
    assert report["candidate"]["path"] == str(candidate)
    assert report["parts"] == 6 and report["skipped"] == 0
    assert report["errors"] == {"live": 0, "shadow": 0}
    assert report["confusion"] == {"pass/pass": 2, "pass/fail": 2, "fail/pass": 0, "fail/fail": 2}
    assert report["agreement"] == pytest.approx(4 / 6, abs=1e-6)
    assert report["per_class"] == {
        "good": {"parts": 1, "disagreements": 0},
        "spot": {"parts": 4, "disagreements": 2},
        "unlabelled": {"parts": 1, "disagreements": 0},
    }
    assert [(d["seq"], d["part_id"], d["live"], d["shadow"], d["truth"]) for d in
            report["disagreements"]] == [(1, "P1", "pass", "fail", "fail"),
                                         (3, "P3", "pass", "fail", "fail")]  # fmt: skip
    for d in report["disagreements"]:
        assert d["camera"] == "cam0" and d["iou"] == 0.0
        assert Path(d["archive"], "record.json").is_file()
    assert report["since"] <= report["until"]

    # The command prints the same report, by state dir or by the station config.
    assert main(["shadow", "report", "--state-dir", str(config.state_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == report
    assert config.source_path is not None
    assert main(["shadow", "report", "--config", str(config.source_path)]) == 0
    out = capsys.readouterr().out
    assert "agreement" in out and "0.6667" in out


def test_shadow_summary_is_published_and_counted_in_metrics(
    compared: tuple[StationConfig, list[PipelineResult], list[dict[str, Any]], Registry],
) -> None:
    from defectd.publish.messages import shadow_message

    _, _, published, registry = compared
    last = published[-1]  # the summary at stop
    message = shadow_message("sh1", last, time.time())
    assert schema_errors("shadow", message) == []
    assert last["parts"] == 6 and last["disagreements"] == 2
    assert last["confusion"]["pass/fail"] == 2
    assert last["per_class"]["spot"] == {"parts": 4, "disagreements": 2}
    text = registry.render()
    assert 'defectd_shadow_parts_total{live="pass",shadow="fail"} 2.0' in text
    assert 'defectd_shadow_disagreements_total{cls="spot"} 2.0' in text
    assert "defectd_shadow_agreement 0.666667" in text


# --------------------------------------------------------------------------- load


class _Gate:
    def __init__(self) -> None:
        self.engaged = False
        self.entered = threading.Event()
        self.release = threading.Event()


class _GatedEngine:
    """An engine that, once the gate is engaged, holds its next inference until released."""

    def __init__(self, inner: Engine, gate: _Gate) -> None:
        self._inner = inner
        self._gate = gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self._gate.engaged:
            self._gate.entered.set()
            assert self._gate.release.wait(30)
        return self._inner.infer(batch)


@pytest.mark.parametrize("drop", ["oldest", "newest"])
def test_a_busy_candidate_skips_frames_and_counts_them(
    tmp_path: Path, models: tuple[Path, Path], drop: str
) -> None:
    live, candidate = models
    shadow = f'path = "{candidate}"\nqueue = 3\ndrop = "{drop}"'
    # One post-processing worker: live results reach the shadow queue in frame order.
    config = _station(tmp_path, live, shadow, pipeline="workers = 1")
    gate = _Gate()

    def opener(path: Path, **kwargs: Any) -> Any:
        return _GatedEngine(open_engine(path, **kwargs), gate)

    registry = Registry()
    runner = ShadowRunner(config, registry=registry, opener=opener)
    runner.start(_live_ref(config))
    gate.engaged = True
    line = _Line(config, runner.observe)
    try:
        line.pipeline.submit(_frame(0, None))
        assert gate.entered.wait(20)  # the candidate holds frame 0
        for seq in range(1, 12):
            line.pipeline.submit(_frame(seq, BRIGHT))
        assert line.pipeline.wait_idle(20)
        # The live line was never held up: every frame has its verdict while the candidate waits.
        assert [r.inspection.verdict.value for r in line.results] == ["pass"] + ["fail"] * 11
        summary = runner.summary()
        assert summary["skipped"] == 8 and summary["queue_depth"] == 3
        assert registry.render().count("defectd_shadow_skipped_total 8.0") == 1
        gate.release.set()
        _wait(lambda: runner.summary()["parts"] == 4)
    finally:
        gate.release.set()
        line.close()
        runner.stop(10.0)
    report = shadow_report(config.state_dir)
    assert report["parts"] == 4 and report["skipped"] == 8
    compared = sorted(r["seq"] for r in _parts(config))
    assert compared == ([0, 9, 10, 11] if drop == "oldest" else [0, 1, 2, 3])


def test_the_candidate_waits_while_the_live_line_is_busy(
    tmp_path: Path, models: tuple[Path, Path]
) -> None:
    live, candidate = models
    config = _station(tmp_path, live, f'path = "{candidate}"\nqueue = 2', pipeline="workers = 1")
    busy = threading.Event()
    busy.set()
    runner = ShadowRunner(config, registry=Registry(), live_busy=busy.is_set)
    runner.start(_live_ref(config))
    line = _Line(config, runner.observe)
    try:
        for seq in range(5):
            line.pipeline.submit(_frame(seq, BRIGHT))
        assert line.pipeline.wait_idle(20)
        time.sleep(0.2)  # the feeder polls every few ms: it would have started by now
        summary = runner.summary()
        assert summary["parts"] == 0 and summary["queue_depth"] == 2 and summary["skipped"] == 3
        busy.clear()  # the live line goes idle: the candidate takes what waits
        _wait(lambda: runner.summary()["parts"] == 2)
    finally:
        line.close()
        runner.stop(10.0)
    assert sorted(r["seq"] for r in _parts(config)) == [3, 4]


def _parts(config: StationConfig) -> list[dict[str, Any]]:
    import sqlite3

    db = sqlite3.connect(config.state_dir / "shadow" / "shadow.sqlite")
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM parts")]
    finally:
        db.close()


# --------------------------------------------------------------------------- the daemon


def _daemon_config(tmp: Path, name: str, live: Path, port: int, shadow: str) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(f"""
{synthetic_station(f"sh-{name}", live)}
height = {SIZE}
width = {SIZE}
rate_hz = 40
count = 40
seed = 7
defect_rate = 0.5
{EVERY_FRAME}
[mqtt]
port = {port}
{NO_HEALTH_NO_ARCHIVE}
[daemon]
state_dir = "{tmp / name}"
exit_when_sources_end = true
drain_timeout_s = 10
{shadow}
""")
    return path


def test_live_verdicts_are_identical_with_and_without_the_shadow(
    tmp_path: Path,
    tiny_model: Path,
    tiny_int8_model: Path,
    mosquitto: Callable[..., Any],
    mqtt_collector: Callable[..., Any],
) -> None:
    broker = mosquitto()
    live = copy_model(tiny_model, tmp_path / "live")
    cand = copy_model(tiny_model, tmp_path / "cand")
    int8 = cand.with_name("model.int8.onnx")
    shutil.copyfile(tiny_int8_model, int8)
    shutil.copyfile(card_path(tiny_int8_model), card_path(int8))
    shadow = f'[shadow]\npath = "{cand}"\nbackend = "openvino"\nprecision = "int8"\nqueue = 8'
    verdicts: dict[str, dict[int, tuple[Any, ...]]] = {}
    for name, section in (("off", ""), ("on", shadow)):
        collector = mqtt_collector(broker.host, broker.port, f"defectd/sh-{name}/#")
        path = _daemon_config(tmp_path, name, live, broker.port, section)
        service = Service(load_station_config(path), notifier=SdNotifier({}), install_signals=False)
        assert service.serve() == 0
        assert collector.wait_for(lambda m: sum(x.topic.endswith("/result") for x in m) >= 40)
        results = {p["result_id"]: p for p in collector.payloads("/result")}
        verdicts[name] = {
            p["seq"]: (p["verdict"], p["rule"], json.dumps(p["defects"]), p["model"]["sha256"])
            for p in results.values()
        }
        if name == "on":
            assert collector.wait_for(lambda m: any(x.topic.endswith("/shadow") for x in m))
            summaries = collector.payloads("/shadow")
            assert all(schema_errors("shadow", s) == [] for s in summaries)
            last = summaries[-1]
            assert last["candidate"]["engine"] == "openvino-int8"
            assert last["parts"] + last["skipped"] == 40
            report = shadow_report(tmp_path / name)
            assert report["parts"] == last["parts"] and report["skipped"] == last["skipped"]
            assert report["candidate"]["sha256"] == file_sha256(cand.with_name("model.int8.onnx"))
            assert report["live"]["sha256"] == file_sha256(live)
            assert report["parts"] > 0
    assert len(verdicts["off"]) == 40
    assert verdicts["on"] == verdicts["off"]
    assert card_path(live).is_file()
