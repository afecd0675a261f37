"""Replay: datasets with truth, folders of images and video files, played back as a camera."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from defectd.data.synth import write_dataset
from defectd.errors import CameraError
from defectd.pipeline.frame import Frame
from defectd.pipeline.sources import (
    EventKind,
    ReplaySourceConfig,
    SourceEvent,
    SourceHealth,
    SourceState,
    make_source,
)


def play(
    config: ReplaySourceConfig, frames_wanted: int | None = None
) -> tuple[list[Frame], list[SourceEvent], SourceHealth]:
    """Play ``config`` to its end (or ``frames_wanted`` frames); return frames, events, health."""
    frames: list[Frame] = []
    events: list[SourceEvent] = []
    done = threading.Event()

    def on_frame(frame: Frame) -> None:
        frames.append(frame)
        if frames_wanted is not None and len(frames) >= frames_wanted:
            done.set()

    def on_event(event: SourceEvent) -> None:
        events.append(event)
        if event.kind == EventKind.END_OF_STREAM:
            done.set()

    source = make_source(config, "station-1")
    source.start(on_frame, on_event)
    try:
        assert done.wait(20)
    finally:
        source.stop()
    return frames, events, source.health()


def test_a_manifest_dataset_replays_with_its_truth(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds", 12, seed=1, height=48, width=64, defect_rate=0.5)
    frames, events, _ = play(ReplaySourceConfig(camera="replay", path=root))
    assert len(frames) == 12
    assert events[-1].kind == EventKind.END_OF_STREAM
    for f in frames:
        assert f.image.shape == (48, 64) and f.image.dtype == np.uint8
        assert f.meta["truth_mask"].shape == (48, 64)
        assert f.meta["truth_defective"] == bool(f.meta["truth_mask"].any())
    assert any(f.meta["truth_defective"] for f in frames)
    assert all(f.part_id for f in frames)
    assert not any("truth_labels" in f.meta for f in frames)


def test_a_class_labelled_dataset_replays_with_its_class_index_truth(tmp_path: Path) -> None:
    from defectd.data.synth import DEFECTS

    root = write_dataset(tmp_path / "ds", 8, seed=1, height=32, width=32, defect_rate=1.0,
                         class_masks=True)  # fmt: skip
    frames, _, _ = play(ReplaySourceConfig(camera="replay", path=root))
    assert len(frames) == 8
    for f in frames:
        index = cv2.imread(str(root.parent / "masks_cls" / f"{f.part_id}.png"), 0)
        assert np.array_equal(f.meta["truth_labels"], index)
        assert f.meta["truth_classes"] == DEFECTS
        assert np.array_equal(f.meta["truth_labels"] > 0, f.meta["truth_mask"] > 0)


def test_a_folder_of_images_plays_sorted_by_name_in_rgb(tmp_path: Path) -> None:
    for i in (2, 0, 1):
        bgr = np.zeros((10, 12, 3), np.uint8)
        bgr[:, :, 2] = 10 * (i + 1)  # red channel in OpenCV's BGR order
        cv2.imwrite(str(tmp_path / f"part_{i}.png"), bgr)
    frames, _, _ = play(ReplaySourceConfig(camera="replay", path=tmp_path, channels=3))
    assert [f.part_id for f in frames] == ["part_0", "part_1", "part_2"]
    assert [int(f.image[0, 0, 0]) for f in frames] == [10, 20, 30]
    assert all(f.image.shape == (10, 12, 3) and f.pixel_format == "RGB8" for f in frames)


def test_a_looped_folder_starts_over(tmp_path: Path) -> None:
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((4, 4), i, np.uint8))
    frames, _, _ = play(
        ReplaySourceConfig(camera="replay", path=tmp_path, loop=True), frames_wanted=7
    )
    assert [f.part_id for f in frames[:7]] == ["0", "1", "2", "0", "1", "2", "0"]
    assert [f.seq for f in frames[:7]] == list(range(7))


def test_an_unreadable_file_is_counted_and_skipped(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((4, 4), np.uint8))
    (tmp_path / "b.png").write_bytes(b"not a png")
    cv2.imwrite(str(tmp_path / "c.png"), np.zeros((4, 4), np.uint8))
    frames, _, health = play(ReplaySourceConfig(camera="replay", path=tmp_path))
    assert [f.part_id for f in frames] == ["a", "c"]
    assert health.errors == 1
    assert health.state is SourceState.STOPPED


def test_a_video_file_plays_frame_by_frame(tmp_path: Path) -> None:
    path = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (32, 24))
    for i in range(5):
        writer.write(np.full((24, 32, 3), 40 * i, np.uint8))
    writer.release()
    frames, _, _ = play(ReplaySourceConfig(camera="replay", path=path))
    assert len(frames) == 5
    assert [f.part_id for f in frames] == [f"line-{i}" for i in range(5)]
    assert all(f.image.shape == (24, 32) for f in frames)
    levels = [int(f.image.mean()) for f in frames]
    assert levels == sorted(levels)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "holds no image files"),
        ("notes.txt", "not a video file"),
    ],
)
def test_a_path_that_cannot_be_replayed_is_refused_at_start(
    tmp_path: Path, name: str, message: str
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    source = make_source(ReplaySourceConfig(camera="replay", path=tmp_path / name), "s")
    with pytest.raises(CameraError, match=f"camera 'replay': replay path .*{message}"):
        source.start(lambda frame: None)
