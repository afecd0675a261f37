"""Archived parts played back as a camera: a dataset, a folder of images or a video file.

``path`` may be
- a dataset folder or its ``manifest.csv`` (as the daemon's archive and ``defectd synth`` write it,
  or an MVTec AD category): frames carry the truth when the dataset has it
  (``meta["truth_mask"]`` ``(H, W)`` uint8 {0, 1}, ``meta["truth_defective"]``,
  ``meta["truth_kinds"]``; for a class-labelled set also ``meta["truth_labels"]``, its
  class-index mask, with ``meta["truth_classes"]`` naming the values) and ``part_id`` is the
  sample's stem;
- any other folder: its image files, sorted by name (``part_id`` = file stem);
- a video file, read with OpenCV (``part_id`` = ``<stem>-<frame index>``).
Images are ``(H, W)`` uint8 for ``channels = 1`` or ``(H, W, 3)`` uint8 RGB for 3.
A file that cannot be read mid-run is counted as an error and skipped, never handed on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from defectd.data.datasets import IMAGE_SUFFIXES, Dataset, open_dataset, read_image
from defectd.errors import CameraError, DataError
from defectd.pipeline.sources.base import EventKind, ReplaySourceConfig, SourceState
from defectd.pipeline.sources.threaded import Pacer, ThreadedSource


@dataclass(frozen=True, slots=True)
class _Item:
    part_id: str
    image: NDArray[np.uint8]
    meta: dict[str, Any] = field(default_factory=dict)


class ReplaySource(ThreadedSource):
    """Plays ``config.path`` once (or in a loop) at ``config.rate_hz`` or unthrottled.

    Unthrottled, ``on_frame`` may block: playback then runs as fast as its consumer.
    """

    def __init__(self, config: ReplaySourceConfig, station: str) -> None:
        super().__init__(config.camera, station, "replay")
        self.config = config
        self._dataset: Dataset | None = None
        self._files: list[Path] = []

    def probe(self) -> None:
        """Open the path as ``start`` does (dataset, image folder or video) and play nothing.

        Raises ``CameraError`` naming the path; ``defectd config check`` calls it.
        """
        self._open()
        self._dataset = None
        self._files = []

    def _open(self) -> None:
        path = self.config.path
        at = f"camera {self.camera!r}: replay path {path}"
        if not path.exists():
            raise CameraError(f"{at} does not exist")
        if path.is_file() and path.name == "manifest.csv":
            path = path.parent
        if path.is_dir():
            if (path / "manifest.csv").is_file() or (path / "train" / "good").is_dir():
                try:
                    self._dataset = open_dataset(path)
                except DataError as exc:
                    raise CameraError(f"{at}: {exc}") from exc
            else:
                self._files = sorted(
                    p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                )
                if not self._files:
                    raise CameraError(
                        f"{at} holds no image files ({', '.join(IMAGE_SUFFIXES)}) "
                        f"and is not a dataset"
                    )
        else:
            capture = cv2.VideoCapture(str(path))
            ok = capture.isOpened() and capture.read()[0]
            capture.release()
            if not ok:
                raise CameraError(f"{at} is not a video file OpenCV can read")
        self._set_state(SourceState.STREAMING)

    def _items(self) -> Iterator[_Item]:
        """One pass over the path; unreadable files are counted and skipped."""
        channels = self.config.channels
        if self._dataset is not None:
            ds = self._dataset
            for sample in ds.samples():
                try:
                    image = ds.load_image(sample, channels)
                    mask = ds.load_mask(sample, (image.shape[0], image.shape[1]))
                    index = ds.load_index(sample, (image.shape[0], image.shape[1]))
                except DataError as exc:
                    self._skip(exc)
                    continue
                classes: dict[str, Any] = {}
                if index is not None:
                    classes = {"truth_labels": index, "truth_classes": ds.label_classes}
                yield _Item(
                    sample.stem,
                    image,
                    {
                        "truth_mask": mask,
                        "truth_defective": sample.has_defect,
                        "truth_kinds": (sample.cls,) if sample.has_defect else (),
                        "split": sample.split,
                        "source_path": str(sample.image),
                        **classes,
                    },
                )
        elif self._files:
            for path in self._files:
                try:
                    image = read_image(path, channels)
                except DataError as exc:
                    self._skip(exc)
                    continue
                yield _Item(path.stem, image, {"source_path": str(path)})
        else:
            yield from self._video_items()

    def _video_items(self) -> Iterator[_Item]:
        path = self.config.path
        capture = cv2.VideoCapture(str(path))
        code = cv2.COLOR_BGR2GRAY if self.config.channels == 1 else cv2.COLOR_BGR2RGB
        try:
            index = 0
            while True:
                ok, bgr = capture.read()
                if not ok:
                    return
                image = np.asarray(cv2.cvtColor(bgr, code), np.uint8)
                yield _Item(f"{path.stem}-{index}", image, {"source_path": str(path)})
                index += 1
        finally:
            capture.release()

    def _skip(self, exc: DataError) -> None:
        self._count(errors=1)
        self._log.warning("replay_file_skipped", error=str(exc))

    def _run(self) -> None:
        pacer = Pacer(self.config.rate_hz, self._stopping)
        pixel_format = "Mono8" if self.config.channels == 1 else "RGB8"
        played = 0
        while True:
            played_this_pass = 0
            for item in self._items():
                if not pacer.wait():
                    return
                self._emit_frame(
                    item.image,
                    t_host_ns=time.monotonic_ns(),
                    t_wall=time.time(),
                    pixel_format=pixel_format,
                    part_id=item.part_id,
                    meta=item.meta,
                )
                played += 1
                played_this_pass += 1
            if not self.config.loop or played_this_pass == 0:
                break
        detail = f"played {played} frames of {self.config.path}"
        self._set_state(SourceState.STOPPED, detail)
        self._emit_event(EventKind.END_OF_STREAM, detail, frames=played)
