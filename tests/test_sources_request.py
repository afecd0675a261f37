"""Frames on request (line mode ``plc-trigger``): the synthetic line renders the part the
simulated PLC names; viky.cti (no TriggerSoftware node) takes the next fresh frame instead."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from defectd.errors import CameraError
from defectd.pipeline.frame import Frame
from defectd.pipeline.parts import synthetic_part_defective
from defectd.pipeline.sources import (
    DeviceSelector,
    GenICamSourceConfig,
    SyntheticSourceConfig,
    TriggeredSource,
    make_source,
)


class Frames:
    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self._cond = threading.Condition()

    def __call__(self, frame: Frame) -> None:
        with self._cond:
            self.frames.append(frame)
            self._cond.notify_all()

    def wait(self, n: int, timeout: float = 10.0) -> list[Frame]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.frames) >= n, timeout), len(self.frames)
            return list(self.frames)


def synthetic(**kw: object) -> SyntheticSourceConfig:
    return SyntheticSourceConfig(camera="line", height=64, width=64, seed=3, **kw)  # type: ignore[arg-type]


def test_synthetic_line_renders_one_part_per_request_with_the_named_truth() -> None:
    source = make_source(synthetic(trigger="request", defect_rate=0.5), "s1")
    assert isinstance(source, TriggeredSource)
    got = Frames()
    source.start(got)
    try:
        time.sleep(0.1)
        assert got.frames == []  # nothing without a request
        keys = [f"P-{n}" for n in range(12)]
        for key in keys:
            source.fire_trigger(key)
        frames = got.wait(12)
    finally:
        source.stop()
    assert [f.meta["truth_part_id"] for f in frames] == keys
    assert [f.meta["truth_defective"] for f in frames] == [
        synthetic_part_defective(3, k, 0.5) for k in keys
    ]
    assert all(f.part_id is None for f in frames)  # the line pairing names the part


def test_the_same_part_renders_the_same_image() -> None:
    images = []
    for _ in range(2):
        source = make_source(synthetic(trigger="request"), "s1")
        got = Frames()
        source.start(got)
        try:
            source.fire_trigger("P-42")  # type: ignore[attr-defined]
            images.append(got.wait(1)[0].image)
        finally:
            source.stop()
    assert np.array_equal(images[0], images[1])


def test_a_free_running_synthetic_line_refuses_requests() -> None:
    source = make_source(synthetic(rate_hz=None, count=1), "s1")
    with pytest.raises(CameraError, match="not 'request'"):
        source.fire_trigger("P")  # type: ignore[attr-defined]


@pytest.mark.slow
def test_viky_takes_one_fresh_frame_per_request_without_a_trigger_node() -> None:
    import genicam

    cti = Path(genicam.__file__).parent / "viky.cti"
    config = GenICamSourceConfig(
        camera="viky",
        producers=(cti,),
        device=DeviceSelector(index=0),
        # 50 fps: the grab thread keeps up with the producer even on a loaded machine.
        nodes={"Width": 160, "Height": 120, "AcquisitionFrameRate": 50.0},
        trigger="request",
        request_substitute=True,
    )
    source = make_source(config, "s1")
    got = Frames()
    source.start(got)
    try:
        time.sleep(0.2)
        assert got.frames == []  # free-running frames nobody asked for are skipped
        fired = []
        for n in range(20):
            fired.append(time.monotonic_ns())
            source.fire_trigger()  # type: ignore[attr-defined]
            got.wait(n + 1)
        frames = got.wait(20)
        health = source.health()
    finally:
        source.stop()
    assert len(frames) == 20
    assert all(f.t_host_ns >= t for f, t in zip(frames, fired, strict=True))
    assert health.lost == 0 and health.timeouts == 0


def test_request_substitute_needs_request_mode() -> None:
    with pytest.raises(ValueError, match="request_substitute"):
        GenICamSourceConfig(camera="c", device=DeviceSelector(index=0), request_substitute=True)
