"""The operator view's parts without a browser: the live feed's encoding policy, the access
rule of the config, the reject gallery's paths."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from defectd.daemon.config import load_station_config
from defectd.daemon.live import LiveFeed, render_live
from defectd.daemon.view import RejectGallery
from defectd.errors import ConfigError
from defectd.pipeline.frame import Frame
from defectd.pipeline.inspection import Defect, Inspection, Verdict
from defectd.pipeline.runner import PipelineResult


def _result(seq: int, camera: str = "cam0", size: int = 64) -> PipelineResult:
    image = np.full((size, size), 100, np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[10:20, 10:20] = 1
    defect = Defect(100, (10, 10, 10, 10), (15.0, 15.0), 0.9, 0.8, area_mm2=0.25)
    ins = Inspection("st", camera, seq, Verdict.FAIL, (defect,), rule="any-defect")
    frame = Frame("st", camera, seq, image, time.monotonic_ns(), time.time())
    return PipelineResult(ins, frame, mask)


def _wait(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_feed_encodes_nothing_while_nobody_watches() -> None:
    feed = LiveFeed(max_fps=100)
    for seq in range(50):
        feed(_result(seq))
    time.sleep(0.1)
    assert feed.encoded == 0 and feed.frames() == {}
    assert not any(t.name == "view-encoder" for t in threading.enumerate())
    feed.stop()


def test_feed_encodes_the_newest_result_per_camera_for_a_viewer() -> None:
    feed = LiveFeed(max_fps=100)
    for seq in range(5):
        feed(_result(seq, "cam0"))
    feed(_result(9, "cam1"))
    feed.subscribe()
    try:
        _wait(lambda: set(feed.frames()) == {"cam0", "cam1"})
        frames = feed.frames()
        assert frames["cam0"].info["seq"] == 4  # the newest, not a backlog
        assert frames["cam1"].info["defects"][0]["area_mm2"] == 0.25
        assert frames["cam0"].jpeg[:3] == b"\xff\xd8\xff"
        assert feed.encoded == 2
    finally:
        feed.unsubscribe()
        feed.stop()


def test_feed_keeps_to_its_rate_cap_per_camera() -> None:
    feed = LiveFeed(max_fps=5)  # one image per 0.2 s
    feed.subscribe()
    try:
        t0 = time.monotonic()
        seq = 0
        while time.monotonic() - t0 < 1.0:
            feed(_result(seq))
            seq += 1
            time.sleep(0.005)
        assert seq > 50
        assert 4 <= feed.encoded <= 7  # ~5 in one second, far fewer than the results
    finally:
        feed.stop()


def test_live_image_is_scaled_before_drawing() -> None:
    bgr = render_live(_result(1, size=200), width=100)
    assert bgr.shape == (100, 100, 3) and bgr.dtype == np.uint8
    assert bgr[7, 7, 2] > bgr[7, 7, 0]  # the defect (10..20 px -> 5..10 px) tinted red


def test_view_off_loopback_without_token_is_refused_naming_the_key(
    tmp_path: Path, tiny_model: Path
) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        f'station = "s"\n[model]\npath = "{tiny_model}"\n'
        '[[cameras]]\ntype = "synthetic"\ncamera = "cam0"\n'
        '[health]\naddress = "0.0.0.0:9464"\n'
    )
    with pytest.raises(ConfigError, match=r"health: token_file: the operator view on 0\.0\.0\.0"):
        load_station_config(path, env={})
    path.write_text(path.read_text() + "view = false\n")
    assert not load_station_config(path, env={}).health.view


def test_gallery_lists_rejects_newest_first_and_stays_inside_the_archive(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    (tmp_path / "overlays").mkdir()
    for stem, verdict in (("20260101T000001.000Z-a", "fail"), ("20260101T000002.000Z-b", "pass"),
                          ("20260101T000003.000Z-c", "error")):  # fmt: skip
        (tmp_path / "results" / f"{stem}.json").write_text(
            f'{{"stem": "{stem}", "verdict": "{verdict}", "camera": "cam0", "defects": []}}'
        )
        cv2.imwrite(str(tmp_path / "overlays" / f"{stem}.png"), np.zeros((40, 80, 3), np.uint8))
    gallery = RejectGallery(tmp_path, size=10)
    assert [r["stem"] for r in gallery.recent()] == [
        "20260101T000003.000Z-c",
        "20260101T000001.000Z-a",
    ]
    thumb = gallery.overlay_jpeg("20260101T000001.000Z-a", 40)
    assert thumb is not None
    decoded = cv2.imdecode(np.frombuffer(thumb, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (20, 40, 3)
    assert gallery.result("../results/20260101T000001.000Z-a") is None
    assert gallery.overlay_jpeg("..", 40) is None
