"""The operator view's live images: the newest result per camera, encoded only for viewers.

``LiveFeed`` is a ``ResultRouter`` observer. On the pipeline's threads it only replaces one
reference per camera under a lock: no copy, no encoding, no waiting. One thread,
``view-encoder``, started when the first viewer subscribes and idle while nobody watches,
turns the newest result of each camera into a downscaled JPEG with the defect overlay, at most
``max_fps`` images per camera and second; results that arrive in between are skipped (a viewer
sees the newest part, never a backlog). Viewers read the encoded ``LiveFrame``s by version.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from defectd.data.palette import class_bgr
from defectd.log import get_logger
from defectd.pipeline.inspection import Inspection, Verdict
from defectd.pipeline.runner import PipelineResult

log = get_logger(__name__)

JPEG_QUALITY = 80
IDLE_WAIT_S = 1.0
# BGR
VERDICT_COLOURS: dict[Verdict, tuple[int, int, int]] = {
    Verdict.PASS: (60, 180, 60),
    Verdict.FAIL: (40, 40, 230),
    Verdict.ERROR: (0, 165, 255),
}


@dataclass(frozen=True, slots=True)
class LiveFrame:
    """One encoded image of a camera: ``version`` grows by one with every image of it."""

    camera: str
    version: int
    jpeg: bytes
    info: dict[str, Any]


def result_info(ins: Inspection) -> dict[str, Any]:
    """What the view shows beside the image: verdict, part, defects (px, mm²), latency."""
    return {
        "camera": ins.camera,
        "seq": ins.seq,
        "part_id": ins.part_id,
        "result_id": ins.result_id,
        "verdict": ins.verdict.value,
        "rule": ins.rule,
        "reason": ins.reason,
        "latency_ms": ins.latencies_ms.get("total"),
        "t_grab_wall": ins.t_grab_wall,
        "model": ins.model_name,
        "defects": [
            {
                "area_px": d.area_px,
                "area_mm2": d.area_mm2,
                "bbox": list(d.bbox),
                "score": round(d.score_max, 3),
            }
            for d in ins.defects
        ],
    }


def to_bgr8(image: NDArray[Any]) -> NDArray[np.uint8]:
    """A frame (``(H, W)`` gray, any unsigned depth, or ``(H, W, 3)`` RGB) as uint8 BGR."""
    img = image
    if img.dtype != np.uint8:  # Mono10/12/16: stretch the used range to 8 bits
        peak = max(int(img.max()), 1)
        img = (img.astype(np.float32) * (255.0 / peak)).astype(np.uint8)
    code = cv2.COLOR_GRAY2BGR if img.ndim == 2 else cv2.COLOR_RGB2BGR
    return np.ascontiguousarray(cv2.cvtColor(img, code), dtype=np.uint8)


def render_live(result: PipelineResult, width: int) -> NDArray[np.uint8]:
    """The frame scaled to at most ``width`` pixels wide, as ``(h, w, 3)`` uint8 BGR, with the
    defect pixels tinted red, their outlines and boxes drawn and a border in the verdict's
    colour. Scaling comes first, so the cost does not grow with the camera's resolution."""
    ins = result.inspection
    image = result.frame.image
    h, w = image.shape[:2]
    scale = min(1.0, width / w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = image if scale == 1.0 else cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    bgr = to_bgr8(small)
    if result.mask is not None and result.mask.any():
        mask: NDArray[Any] = result.mask
        if scale != 1.0:
            mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
        # A multi-class mask holds class index + 1 per pixel: one colour per class.
        for value in range(1, int(mask.max()) + 1):
            sel = mask == value
            if not sel.any():
                continue
            tint = np.array(class_bgr(value - 1))
            bgr[sel] = (bgr[sel] * 0.5 + tint * 0.5).astype(np.uint8)
            contours, _ = cv2.findContours(
                sel.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
            )
            cv2.drawContours(bgr, contours, -1, class_bgr(value - 1), 1)
    for d in ins.defects:
        x, y, bw, bh = (round(v * scale) for v in d.bbox)
        cv2.rectangle(bgr, (x, y), (x + max(bw, 1), y + max(bh, 1)), (0, 255, 255), 1)
    colour = VERDICT_COLOURS.get(ins.verdict, (128, 128, 128))
    cv2.rectangle(bgr, (0, 0), (size[0] - 1, size[1] - 1), colour, 3)
    return bgr


def encode_jpeg(bgr: NDArray[np.uint8], quality: int = JPEG_QUALITY) -> bytes:
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return bytes(buf)


class LiveFeed:
    """Keeps the newest result per camera (``__call__``, from pipeline threads) and encodes
    it for viewers on its own thread (``subscribe``/``unsubscribe``, ``frames``, ``stop``).

    ``encoded`` counts the images made.
    """

    def __init__(
        self,
        *,
        max_fps: float = 2.0,
        width: int = 480,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_fps <= 0:
            raise ValueError("max_fps must be > 0")
        self.period_s = 1.0 / max_fps
        self.width = width
        self._clock = clock
        self._lock = threading.Lock()
        self._latest: dict[str, PipelineResult] = {}
        self._frames: dict[str, LiveFrame] = {}
        self._last_encode: dict[str, float] = {}
        self._viewers = 0
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._stopping = False
        self._idle = False
        self._arrivals = 0
        self._thread: threading.Thread | None = None
        self.encoded = 0

    # -- hot path -------------------------------------------------------------------------

    def __call__(self, result: PipelineResult) -> None:
        """A new result: remember it as its camera's newest (replacing an unencoded one)."""
        with self._lock:
            self._latest[result.inspection.camera] = result
            self._arrivals += 1
            wake = self._viewers > 0 and self._idle
        if wake:
            self._wake.set()

    # -- viewers --------------------------------------------------------------------------

    @property
    def viewers(self) -> int:
        with self._lock:
            return self._viewers

    def subscribe(self) -> None:
        """One more viewer; the encoder thread starts with the first."""
        with self._lock:
            self._viewers += 1
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._run, name="view-encoder", daemon=True)
                self._thread.start()
        self._wake.set()

    def unsubscribe(self) -> None:
        with self._lock:
            self._viewers = max(0, self._viewers - 1)

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def frames(self) -> dict[str, LiveFrame]:
        """The newest encoded image of every camera that has one."""
        with self._lock:
            return dict(self._frames)

    def frame(self, camera: str) -> LiveFrame | None:
        with self._lock:
            return self._frames.get(camera)

    def stop(self, timeout: float = 2.0) -> None:
        with self._lock:
            self._stopping = True
            thread = self._thread
        self._stopped.set()
        self._wake.set()
        if thread is not None:
            thread.join(timeout)

    # -- encoder thread -------------------------------------------------------------------

    def _due(self, now: float) -> tuple[list[PipelineResult], float, int]:
        """Results to encode now, how long until the next one is due (or the idle wait), and
        the arrival count they were chosen at."""
        due: list[PipelineResult] = []
        wait = IDLE_WAIT_S
        with self._lock:
            arrivals = self._arrivals
            if self._viewers == 0:
                return due, wait, arrivals
            for camera, result in self._latest.items():
                last = self._frames.get(camera)
                if last is not None and last.info["result_id"] == result.inspection.result_id:
                    continue
                left = self._last_encode.get(camera, -1e9) + self.period_s - now
                if left <= 0:
                    due.append(result)
                else:
                    wait = min(wait, left)
        return due, wait, arrivals

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
            self._wake.clear()  # before looking: a result arriving after the look wakes us
            due, wait, seen = self._due(self._clock())
            for result in due:
                self._encode(result)
            if due:
                continue
            if wait < IDLE_WAIT_S:
                # A newer result waits for its camera's rate cap: sleep it out, deaf to the
                # results that keep arriving meanwhile (only a stop cuts it short).
                self._stopped.wait(wait)
            else:
                # Nothing new: the next result wakes us (results only signal an idle encoder,
                # so one that came since the look is caught here instead).
                with self._lock:
                    if self._arrivals != seen:
                        continue
                    self._idle = True
                self._wake.wait(wait)
                with self._lock:
                    self._idle = False

    def _encode(self, result: PipelineResult) -> None:
        ins = result.inspection
        try:
            jpeg = encode_jpeg(render_live(result, self.width))
        except Exception as exc:  # a bad frame must not stop the view
            log.warning("view_encode_failed", camera=ins.camera, seq=ins.seq, error=repr(exc))
            jpeg = b""
        with self._lock:
            last = self._frames.get(ins.camera)
            version = last.version + 1 if last is not None else 1
            self._frames[ins.camera] = LiveFrame(ins.camera, version, jpeg, result_info(ins))
            self._last_encode[ins.camera] = self._clock()
            self.encoded += 1
