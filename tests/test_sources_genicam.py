"""The GenICam source on the real harvesters path, against the simulated viky.cti producer."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from defectd.errors import CameraError
from defectd.pipeline.frame import Frame
from defectd.pipeline.sources import (
    DeviceSelector,
    EventKind,
    GenICamSourceConfig,
    SourceEvent,
    SourceState,
    make_sources,
)
from defectd.pipeline.sources.genicam import GenICamSource
from defectd.pipeline.sources.gentl import GenTLHub, bundled_producer

VIKY = bundled_producer()
VGA_MONO8 = {"Width": 640, "Height": 480, "PixelFormat": "Mono8", "AcquisitionFrameRate": 200.0}


def viky_config(serial: str = "0", **overrides: Any) -> GenICamSourceConfig:
    fields: dict[str, Any] = {
        "camera": f"cam{serial}",
        "producers": (VIKY,),
        "device": DeviceSelector(serial=serial),
        "nodes": VGA_MONO8,
        "reconnect_backoff_min_s": 0.05,
        "reconnect_backoff_max_s": 0.2,
    }
    fields.update(overrides)
    return GenICamSourceConfig(**fields)


class Sink:
    """Collects frames and events; ``wait_frames(n)`` blocks until ``n`` frames arrived."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.events: list[SourceEvent] = []
        self._cond = threading.Condition()

    def on_frame(self, frame: Frame) -> None:
        with self._cond:
            self.frames.append(frame)
            self._cond.notify_all()

    def on_event(self, event: SourceEvent) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def wait_frames(self, n: int, timeout: float = 10.0) -> bool:
        return self.wait_for(lambda: len(self.frames) >= n, timeout)

    def kinds(self) -> list[str]:
        with self._cond:
            return [e.kind for e in self.events]


@pytest.fixture
def started() -> Iterator[Callable[..., tuple[GenICamSource, Sink]]]:
    """Start sources and make sure every one is stopped (devices released) after the test."""
    sources: list[GenICamSource] = []

    def start(config: GenICamSourceConfig, hub: GenTLHub | None = None) -> tuple[Any, Sink]:
        source = GenICamSource(config, "station-1", hub=hub)
        sink = Sink()
        source.start(sink.on_frame, sink.on_event)
        sources.append(source)
        return source, sink

    yield start
    for source in sources:
        source.stop()


def test_enumerates_the_three_viky_devices() -> None:
    hub = GenTLHub([VIKY])
    try:
        devices = hub.describe()
    finally:
        hub.close()
    assert [d.serial for d in devices] == ["0", "1", "2"]
    assert {d.model for d in devices} == {"Viky"}
    assert all(d.access == "available" for d in devices)
    assert all(d.nodes["PixelFormat"] in ("Mono8", "RGBa8") for d in devices)
    assert all(100 <= int(d.nodes["Width"]) <= 800 for d in devices)


def test_grabs_200_mono8_vga_frames_at_200_fps_with_increasing_sequence_numbers(
    started: Callable[..., tuple[GenICamSource, Sink]],
) -> None:
    source, sink = started(viky_config())
    assert sink.wait_frames(200, timeout=10)
    frames = sink.frames[:200]
    assert [f.seq for f in frames] == list(range(200))
    ids = [f.meta["frame_id"] for f in frames]
    assert all(b > a for a, b in itertools.pairwise(ids))
    hosts = [f.t_host_ns for f in frames]
    assert all(b >= a for a, b in itertools.pairwise(hosts))
    assert all(f.image.shape == (480, 640) and f.image.dtype == np.uint8 for f in frames)
    assert {f.pixel_format for f in frames} == {"Mono8"}
    assert {(f.station, f.camera) for f in frames} == {("station-1", "cam0")}
    # viky stamps every buffer 0: no camera time rather than a wrong one.
    assert all(f.t_camera_ns is None for f in frames)
    health = source.health()
    assert health.state is SourceState.STREAMING
    assert health.frames >= 200 and health.errors == 0 and health.reconnects == 0
    assert health.fps > 100


@pytest.mark.parametrize("channels", [1, 3])
def test_rgba8_is_converted_to_the_models_channels(
    started: Callable[..., tuple[GenICamSource, Sink]], channels: int
) -> None:
    nodes = {**VGA_MONO8, "PixelFormat": "RGBa8"}
    _, sink = started(viky_config(nodes=nodes, channels=channels))
    assert sink.wait_frames(200, timeout=10)
    frames = sink.frames[:200]
    assert [f.seq for f in frames] == list(range(200))
    shape = (480, 640) if channels == 1 else (480, 640, 3)
    assert all(f.image.shape == shape and f.image.dtype == np.uint8 for f in frames)
    assert {f.pixel_format for f in frames} == {"RGBa8"}
    assert all(f.image.flags.c_contiguous and f.image.flags.owndata for f in frames[:5])


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        ({"Width": 900}, ["'cam0'", "Width = 900", "out of range 100..800"]),
        ({"PixelFormat": "Mono16"}, ["PixelFormat = 'Mono16'", "not one of", "RGBa8", "Mono8"]),
        ({"AcquisitionFrameRate": 500}, ["AcquisitionFrameRate = 500", "1..200 Hz"]),
        ({"ExposureTime": 1000.0}, ["ExposureTime", "has no node"]),
        ({"PayloadSize": 10}, ["PayloadSize = 10", "not writable"]),
        ({"Width": "wide"}, ["Width = 'wide'", "takes an integer in 100..800"]),
    ],
)
def test_an_invalid_node_setting_is_a_clear_error_before_acquisition(
    nodes: dict[str, Any], expected: list[str]
) -> None:
    source = GenICamSource(viky_config(nodes=nodes), "station-1")
    sink = Sink()
    with pytest.raises(CameraError) as err:
        source.start(sink.on_frame, sink.on_event)
    message = str(err.value)
    assert "\n" not in message
    for part in expected:
        assert part in message
    assert sink.frames == []
    assert source.health().state is SourceState.FAILED


def test_an_unknown_device_names_the_devices_that_exist() -> None:
    source = GenICamSource(viky_config(serial="7"), "station-1")
    with pytest.raises(CameraError, match=r"no device with serial '7'.*serial '0'.*serial '2'"):
        source.start(Sink().on_frame)


def test_a_software_trigger_on_a_camera_without_one_is_refused() -> None:
    source = GenICamSource(viky_config(trigger="software"), "station-1")
    with pytest.raises(CameraError, match="has no software trigger"):
        source.start(Sink().on_frame)


def test_destroying_the_acquirer_mid_run_reconnects_and_frames_flow_again(
    started: Callable[..., tuple[GenICamSource, Sink]],
) -> None:
    source, sink = started(viky_config())
    assert sink.wait_frames(20)
    unplugged = source.acquirer
    assert unplugged is not None
    unplugged.destroy()  # what the source sees when the cable is pulled
    assert sink.wait_for(lambda: EventKind.CAMERA_BACK in sink.kinds())
    seen = len(sink.frames)
    assert sink.wait_frames(seen + 50)
    kinds = sink.kinds()
    assert kinds.index(EventKind.CAMERA_LOST) < kinds.index(EventKind.RECONNECTING)
    assert kinds.index(EventKind.RECONNECTING) < kinds.index(EventKind.CAMERA_BACK)
    seqs = [f.seq for f in sink.frames]
    assert seqs == list(range(len(seqs)))  # numbering goes on across the reconnect
    health = source.health()
    assert health.reconnects == 1
    assert health.state is SourceState.STREAMING
    assert source.acquirer is not unplugged


def test_stop_releases_the_device_so_a_second_open_works() -> None:
    first = GenICamSource(viky_config(), "station-1")
    sink = Sink()
    first.start(sink.on_frame)
    assert sink.wait_frames(5)
    first.stop()
    first.stop()  # idempotent
    assert first.health().state is SourceState.STOPPED

    second = GenICamSource(viky_config(), "station-1")
    again = Sink()
    second.start(again.on_frame)
    try:
        assert again.wait_frames(5)
    finally:
        second.stop()


def test_cameras_sharing_a_hub_stream_together_and_recover_independently(
    started: Callable[..., tuple[GenICamSource, Sink]],
) -> None:
    hub = GenTLHub([VIKY])
    try:
        small = {**VGA_MONO8, "Width": 320, "Height": 240, "AcquisitionFrameRate": 100.0}
        left, left_sink = started(viky_config("0", nodes=small), hub)
        right, right_sink = started(viky_config("1", nodes=small), hub)
        assert left_sink.wait_frames(10) and right_sink.wait_frames(10)
        assert left.acquirer is not None
        left.acquirer.destroy()
        assert left_sink.wait_for(lambda: EventKind.CAMERA_BACK in left_sink.kinds())
        seen = len(right_sink.frames)
        assert right_sink.wait_frames(seen + 20)
        assert right.health().reconnects == 0
        assert left.health().reconnects == 1
        left.stop()
        right.stop()
    finally:
        hub.close()


def test_fetch_timeouts_are_counted_and_end_in_a_reconnect(
    started: Callable[..., tuple[GenICamSource, Sink]],
) -> None:
    # 1 frame/s against a 0.1 s deadline: timeouts pile up before the first frame arrives.
    nodes = {**VGA_MONO8, "AcquisitionFrameRate": 1.0}
    source, sink = started(
        viky_config(nodes=nodes, fetch_timeout_s=0.1, max_consecutive_timeouts=3)
    )
    assert sink.wait_for(lambda: EventKind.CAMERA_LOST in sink.kinds(), timeout=5)
    lost = next(e for e in sink.events if e.kind == EventKind.CAMERA_LOST)
    assert "no frame for 3 x 0.1 s" in lost.detail
    assert source.health().timeouts >= 3


def test_frames_the_consumer_was_too_slow_for_are_counted_as_lost(
    started: Callable[..., tuple[GenICamSource, Sink]],
) -> None:
    slow: queue.Queue[Frame] = queue.Queue()

    def on_frame(frame: Frame) -> None:
        slow.put(frame)
        time.sleep(0.02)  # a consumer at 50 fps behind a 200 fps camera with 2 buffers

    source = GenICamSource(viky_config(num_buffers=2), "station-1")
    sink = Sink()
    source.start(on_frame, sink.on_event)
    try:
        assert sink.wait_for(lambda: EventKind.FRAMES_LOST in sink.kinds(), timeout=5)
    finally:
        source.stop()
    frames = list(slow.queue)
    ids = [f.meta["frame_id"] for f in frames]
    gaps = sum(b - a - 1 for a, b in itertools.pairwise(ids))
    assert gaps > 0
    assert source.health().lost == gaps
    assert [f.seq for f in frames] == list(range(len(frames)))


def test_a_consumer_blocking_past_the_stall_deadline_is_not_taken_for_a_dead_camera(
    started: Callable[..., tuple[GenICamSource, Sink]],
) -> None:
    blocked_once = threading.Event()
    sink = Sink()

    def on_frame(frame: Frame) -> None:
        if not blocked_once.is_set():
            blocked_once.set()
            time.sleep(0.6)  # twice the stall deadline, inside on_frame
        sink.on_frame(frame)

    source = GenICamSource(viky_config(stall_timeout_s=0.3), "station-1")
    source.start(on_frame, sink.on_event)
    try:
        assert sink.wait_frames(50)
    finally:
        source.stop()
    assert source.health().reconnects == 0
    assert EventKind.CAMERA_LOST not in sink.kinds()


def test_a_refresh_re_enumerates_once_per_generation_and_voids_open_acquirers() -> None:
    hub = GenTLHub([VIKY])
    try:
        acquirer = hub.open(DeviceSelector(serial="1"), "cam1")
        seen = hub.generation
        hub.refresh(seen)
        assert hub.generation == seen + 1
        assert not acquirer.is_valid()  # Harvester.update() destroyed it
        assert hub.device_count() == 3
        hub.refresh(seen)  # a second camera that lost its device in the same event
        assert hub.generation == seen + 1
        reopened = hub.open(DeviceSelector(serial="1"), "cam1")
        hub.release(reopened)
    finally:
        hub.close()


def test_a_stations_cameras_built_together_share_the_producer() -> None:
    small = {**VGA_MONO8, "Width": 320, "Height": 240, "AcquisitionFrameRate": 100.0}
    configs = [viky_config("0", nodes=small), viky_config("2", nodes=small)]
    sources = make_sources(configs, "station-1")
    sinks = [Sink() for _ in sources]
    try:
        for source, sink in zip(sources, sinks, strict=True):
            source.start(sink.on_frame, sink.on_event)
        assert all(sink.wait_frames(20) for sink in sinks)
    finally:
        for source in sources:
            source.stop()
    assert [s.frames[0].camera for s in sinks] == ["cam0", "cam2"]
    hub = GenTLHub([VIKY])  # the last camera out unloaded the shared producer
    try:
        assert hub.device_count() == 3
    finally:
        hub.close()


def test_cameras_built_apart_on_one_producer_are_told_to_share_it(
    started: Callable[..., tuple[GenICamSource, Sink]],
) -> None:
    started(viky_config("0"))
    second = GenICamSource(viky_config("1"), "station-1")
    with pytest.raises(CameraError, match=r"see no device.*make_sources"):
        second.start(Sink().on_frame)
