"""Software trigger on TLSimu.cti, the simulated producer of the
genicam 1.5.0 wheel (fetched at test time, never committed; skipped when it cannot be)."""

from __future__ import annotations

import itertools
import statistics
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from defectd.pipeline.frame import Frame
from defectd.pipeline.sources import DeviceSelector, GenICamSourceConfig
from defectd.pipeline.sources.genicam import GenICamSource

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tlsimu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tlsimu")
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "genicam==1.5.0", "--no-deps",
             "--only-binary=:all:", "--timeout", "10", "--retries", "1", "-d", str(folder), "-q"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"genicam 1.5.0 wheel (TLSimu.cti) cannot be fetched: {exc}")
    wheels = list(folder.glob("genicam-1.5.0-*.whl"))
    if not wheels:
        pytest.skip("pip fetched no genicam 1.5.0 wheel for this platform")
    with zipfile.ZipFile(wheels[0]) as wheel:
        for name in wheel.namelist():
            if name.endswith(("/TLSimu.cti", "/libVirtualFG.so")):
                (folder / Path(name).name).write_bytes(wheel.read(name))
    cti = folder / "TLSimu.cti"
    if not cti.is_file():
        pytest.skip("the genicam 1.5.0 wheel holds no TLSimu.cti")
    return cti


def grab(config: GenICamSourceConfig, n: int) -> list[Frame]:
    frames: list[Frame] = []
    enough = threading.Event()

    def on_frame(frame: Frame) -> None:
        frames.append(frame)
        if len(frames) >= n:
            enough.set()

    source = GenICamSource(config, "station-1")
    source.start(on_frame)
    try:
        assert enough.wait(10)
    finally:
        source.stop()
    return frames[:n]


def config(cti: Path, **fields: Any) -> GenICamSourceConfig:
    return GenICamSourceConfig(
        camera="sim", producers=(cti,), device=DeviceSelector(index=0), **fields
    )


def test_software_trigger_fires_at_the_configured_rate(tlsimu: Path) -> None:
    frames = grab(config(tlsimu, trigger="software", trigger_rate_hz=20.0), 8)
    ids = [f.meta["frame_id"] for f in frames]
    assert ids == list(range(ids[0], ids[0] + 8))  # one frame per trigger, none lost
    gaps_ms = [(b.t_host_ns - a.t_host_ns) / 1e6 for a, b in itertools.pairwise(frames)]
    assert 35 <= statistics.median(gaps_ms) <= 70
    assert all(f.t_camera_ns is not None for f in frames)  # TLSimu stamps its buffers


def test_software_trigger_without_a_rate_triggers_on_each_arrival(tlsimu: Path) -> None:
    frames = grab(config(tlsimu, trigger="software"), 10)
    assert [f.seq for f in frames] == list(range(10))


def test_frames_are_converted_from_the_format_the_buffer_carries(tlsimu: Path) -> None:
    # TLSimu accepts PixelFormat = BGR8 but still sends Mono8 buffers: the buffer decides.
    cfg = config(tlsimu, nodes={"PixelFormat": "BGR8"}, channels=3, trigger="software")
    frames = grab(cfg, 2)
    assert all(f.pixel_format == "Mono8" for f in frames)
    assert all(f.image.shape == (512, 512, 3) and f.image.dtype == np.uint8 for f in frames)
    gray = frames[0].image
    assert np.array_equal(gray[:, :, 0], gray[:, :, 2])  # grey stays grey in RGB


def test_trigger_on_request_fires_one_frame_per_request(tlsimu: Path) -> None:
    frames: list[Frame] = []
    cond = threading.Condition()

    def on_frame(frame: Frame) -> None:
        with cond:
            frames.append(frame)
            cond.notify_all()

    source = GenICamSource(config(tlsimu, trigger="request", fetch_timeout_s=0.2), "station-1")
    source.start(on_frame)
    try:
        with cond:
            assert not cond.wait_for(lambda: len(frames) > 0, 0.6)  # idle: no frame, no timeout
        for n in range(1, 31):
            source.fire_trigger()
            with cond:
                assert cond.wait_for(lambda n=n: len(frames) >= n, 5)  # type: ignore[misc]
        health = source.health()
    finally:
        source.stop()
    ids = [f.meta["frame_id"] for f in frames]
    assert len(frames) == 30 and ids == list(range(ids[0], ids[0] + 30))
    assert health.timeouts == 0 and health.lost == 0
