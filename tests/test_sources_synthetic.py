"""The synthetic line: seeded parts with ground truth, at a rate or as fast as the consumer."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from defectd.errors import CameraError
from defectd.pipeline.frame import Frame
from defectd.pipeline.sources import (
    EventKind,
    SourceEvent,
    SourceState,
    SyntheticSourceConfig,
    make_source,
)


def run_line(
    config: SyntheticSourceConfig, timeout: float = 20.0
) -> tuple[list[Frame], list[SourceEvent]]:
    """Start the line, wait for its end of stream, return what it delivered."""
    frames: list[Frame] = []
    events: list[SourceEvent] = []
    done = threading.Event()

    def on_event(event: SourceEvent) -> None:
        events.append(event)
        if event.kind == EventKind.END_OF_STREAM:
            done.set()

    source = make_source(config, "station-1")
    source.start(frames.append, on_event)
    try:
        assert done.wait(timeout)
    finally:
        source.stop()
    return frames, events


def test_a_counted_line_delivers_parts_with_their_ground_truth() -> None:
    config = SyntheticSourceConfig(
        camera="line", rate_hz=None, height=64, width=96, defect_rate=0.5, seed=3, count=40
    )
    frames, events = run_line(config)
    assert [f.seq for f in frames] == list(range(40))
    assert [f.part_id for f in frames] == [f"line-{i}" for i in range(40)]
    for f in frames:
        assert f.image.shape == (64, 96) and f.image.dtype == np.uint8
        mask = f.meta["truth_mask"]
        assert mask.shape == (64, 96) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1}
        assert f.meta["truth_defective"] == bool(mask.any()) == bool(f.meta["truth_kinds"])
    defective = sum(f.meta["truth_defective"] for f in frames)
    assert 8 <= defective <= 32
    assert events[-1].kind == EventKind.END_OF_STREAM


def test_the_same_seed_gives_the_same_line() -> None:
    config = SyntheticSourceConfig(
        camera="line", rate_hz=None, height=32, width=32, seed=11, count=5
    )
    first, _ = run_line(config)
    second, _ = run_line(config)
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a.image, b.image)
        assert np.array_equal(a.meta["truth_mask"], b.meta["truth_mask"])


def test_colour_parts_are_rgb_from_the_chosen_surfaces() -> None:
    config = SyntheticSourceConfig(
        camera="line", rate_hz=None, height=32, width=48, channels=3, surfaces=("woven",), count=3
    )
    frames, _ = run_line(config)
    assert all(f.image.shape == (32, 48, 3) and f.pixel_format == "RGB8" for f in frames)
    assert {f.meta["surface"] for f in frames} == {"woven"}


def test_the_line_keeps_its_rate() -> None:
    config = SyntheticSourceConfig(camera="line", rate_hz=50.0, height=32, width=32, count=26)
    t0 = time.monotonic_ns()
    frames, _ = run_line(config)
    span_s = (frames[-1].t_host_ns - frames[0].t_host_ns) / 1e9
    assert 0.45 <= span_s <= 0.8  # 25 periods of 20 ms
    assert frames[0].t_host_ns >= t0


def test_an_unthrottled_line_waits_for_a_blocking_consumer() -> None:
    config = SyntheticSourceConfig(camera="line", rate_hz=None, height=32, width=32)
    source = make_source(config, "station-1")
    gate = threading.Semaphore(0)
    got: list[Frame] = []

    def on_frame(frame: Frame) -> None:
        got.append(frame)
        gate.acquire()  # back-pressure: one part per release

    source.start(on_frame)
    try:
        for _ in range(3):
            gate.release()
        deadline = time.monotonic() + 5
        while len(got) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert len(got) == 4  # three released, the fourth waits in on_frame
        assert source.health().state is SourceState.STREAMING
    finally:
        for _ in range(10):
            gate.release()
        source.stop()
    assert source.health().state is SourceState.STOPPED


def test_an_unknown_surface_is_refused_at_start() -> None:
    source = make_source(SyntheticSourceConfig(camera="line", surfaces=("marble",)), "s")
    with pytest.raises(
        CameraError, match=r"camera 'line': surfaces: unknown 'marble'; choose from brushed"
    ):
        source.start(lambda frame: None)


def test_a_failing_consumer_is_counted_and_the_line_goes_on() -> None:
    config = SyntheticSourceConfig(camera="line", rate_hz=None, height=16, width=16, count=10)
    seen: list[int] = []
    done = threading.Event()

    def on_frame(frame: Frame) -> None:
        seen.append(frame.seq)
        if frame.seq % 2:
            raise RuntimeError("consumer bug")

    source = make_source(config, "station-1")
    source.start(on_frame, lambda e: done.set() if e.kind == EventKind.END_OF_STREAM else None)
    try:
        assert done.wait(10)
    finally:
        source.stop()
    assert seen == list(range(10))
    assert source.health().errors == 5
