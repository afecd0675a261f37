"""What every source shares: one named thread, counters, health and event dispatch.

A concrete source subclasses ``ThreadedSource`` and implements ``_open`` (runs in ``start``,
in the caller's thread, so configuration errors surface there), ``_run`` (the source thread's
body; returns when ``_stopping`` is set or the source is done) and ``_close`` (releases the
device; runs in ``stop``, after the thread has ended or given up).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from structlog.typing import FilteringBoundLogger

from defectd.errors import CameraError
from defectd.log import RateLimiter, get_logger
from defectd.pipeline.frame import Frame
from defectd.pipeline.sources.base import (
    EventKind,
    OnEvent,
    OnFrame,
    SourceEvent,
    SourceHealth,
    SourceState,
)

# fps is measured over the last frames received, bounded in count and in age.
_FPS_WINDOW = 128
_FPS_MAX_AGE_NS = 5_000_000_000
# A consumer failing on every frame is logged once per interval, not 200 times a second.
_ERROR_LOG_INTERVAL_S = 1.0


class ThreadedSource:
    """Base of the sources: life cycle, counters and callbacks; subclasses supply the device."""

    camera: str

    def __init__(self, camera: str, station: str, kind: str) -> None:
        self.camera = camera
        self.station = station
        self._kind = kind
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_frame: OnFrame | None = None
        self._on_event: OnEvent | None = None
        self._state = SourceState.STOPPED
        self._detail = ""
        self._seq = 0
        self._frames = 0
        self._lost = 0
        self._timeouts = 0
        self._reconnects = 0
        self._errors = 0
        self._arrivals: deque[int] = deque(maxlen=_FPS_WINDOW)
        self._last_frame_ns: int | None = None
        self._started = False
        self._consumer_errors = RateLimiter(_ERROR_LOG_INTERVAL_S)

    @property
    def _log(self) -> FilteringBoundLogger:
        # Built per call so that a source made before logging is configured follows it.
        return get_logger(type(self).__module__).bind(camera=self.camera, source=self._kind)

    # --- contract ---------------------------------------------------------------------------

    def start(self, on_frame: OnFrame, on_event: OnEvent | None = None) -> None:
        """Open the device (``CameraError`` on a bad configuration) and start the thread."""
        with self._lock:
            if self._started:
                raise CameraError(f"camera {self.camera!r}: source already started")
            self._started = True
            self._state = SourceState.STARTING
        self._on_frame = on_frame
        self._on_event = on_event
        self._stopping.clear()
        try:
            self._open()
        except BaseException:
            with self._lock:
                self._started = False
                self._state = SourceState.FAILED
            raise
        self._thread = threading.Thread(
            target=self._thread_main, name=f"source-{self.camera}", daemon=True
        )
        self._thread.start()
        self._log.info("source_started")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and release the device; safe to call twice or before ``start``."""
        self._stopping.set()
        self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                self._log.error("source_thread_did_not_stop", timeout_s=timeout)
        with self._lock:
            was_started = self._started
            self._started = False
            if self._state is not SourceState.FAILED:
                self._state = SourceState.STOPPED
        if was_started:
            self._close()
            self._log.info("source_stopped", frames=self._frames, lost=self._lost)
        self._thread = None

    def number_from(self, seq: int) -> None:
        """Give the next frame the number ``seq`` (before ``start``)."""
        if seq < 0:
            raise ValueError(f"camera {self.camera!r}: frame numbers start at 0, not {seq}")
        self._seq = seq

    def health(self) -> SourceHealth:
        now = time.monotonic_ns()
        with self._lock:
            arrivals = [t for t in self._arrivals if now - t <= _FPS_MAX_AGE_NS]
            fps = 0.0
            if len(arrivals) >= 2:
                span = max(now, arrivals[-1]) - arrivals[0]
                fps = (len(arrivals) - 1) * 1e9 / span if span > 0 else 0.0
            age = None if self._last_frame_ns is None else (now - self._last_frame_ns) / 1e9
            return SourceHealth(
                camera=self.camera,
                state=self._state,
                frames=self._frames,
                lost=self._lost,
                timeouts=self._timeouts,
                reconnects=self._reconnects,
                errors=self._errors,
                fps=fps,
                last_frame_age_s=age,
                detail=self._detail,
            )

    # --- for subclasses ---------------------------------------------------------------------

    def _open(self) -> None:
        """Open and configure the device; raise ``CameraError`` naming what is wrong."""

    def _run(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        """Release the device. Called once per successful ``start``."""

    def _wake(self) -> None:
        """Interrupt a wait in ``_run`` so that the thread sees ``_stopping`` promptly."""

    def _emit_frame(
        self,
        image: Any,
        *,
        t_host_ns: int,
        t_wall: float,
        pixel_format: str,
        t_camera_ns: int | None = None,
        part_id: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Number the frame, count it and hand it to ``on_frame`` (which may block).

        An exception from ``on_frame`` is counted in ``errors`` and logged (at most once a
        second); the source goes on with the next frame.
        """
        frame = Frame(
            station=self.station,
            camera=self.camera,
            seq=self._seq,
            image=image,
            t_host_ns=t_host_ns,
            t_wall=t_wall,
            pixel_format=pixel_format,
            t_camera_ns=t_camera_ns,
            part_id=part_id,
            meta=meta if meta is not None else {},
        )
        self._seq += 1
        with self._lock:
            self._frames += 1
            self._arrivals.append(t_host_ns)
            self._last_frame_ns = t_host_ns
        assert self._on_frame is not None
        try:
            self._on_frame(frame)
        except Exception:  # a failing consumer must not stop the camera; it is counted
            self._count(errors=1)
            suppressed = self._consumer_errors.admit("on_frame_failed")
            if suppressed is not None:
                self._log.exception("on_frame_failed", seq=frame.seq, suppressed=suppressed)

    def _emit_event(self, kind: EventKind, detail: str = "", **fields: Any) -> None:
        """Log ``kind`` with ``fields`` and hand the event to ``on_event`` when one is set."""
        level = "warning" if kind in (EventKind.CAMERA_LOST, EventKind.FAILED) else "info"
        getattr(self._log, level)(str(kind), detail=detail, **fields)
        if self._on_event is None:
            return
        try:
            self._on_event(SourceEvent.now(self.camera, kind, detail))
        except Exception:  # a broken event sink must not stop the camera
            self._log.exception("on_event_failed", kind=str(kind))

    def _set_state(self, state: SourceState, detail: str = "") -> None:
        with self._lock:
            self._state = state
            self._detail = detail

    def _count(
        self, *, lost: int = 0, timeouts: int = 0, reconnects: int = 0, errors: int = 0
    ) -> None:
        with self._lock:
            self._lost += lost
            self._timeouts += timeouts
            self._reconnects += reconnects
            self._errors += errors

    # --- thread body ------------------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            self._run()
        except Exception as exc:  # the thread must end with a state, never silently
            self._count(errors=1)
            self._set_state(SourceState.FAILED, f"{type(exc).__name__}: {exc}")
            self._log.exception("source_failed")
            self._emit_event(EventKind.FAILED, f"{type(exc).__name__}: {exc}")
            return
        with self._lock:
            if self._state is not SourceState.FAILED:
                self._state = SourceState.STOPPED


class Pacer:
    """Paces a loop at ``rate_hz`` on the monotonic clock (``None`` = no pacing).

    Missed ticks are not made up: after a stall the schedule restarts from now, so a slow
    consumer never causes a burst.
    """

    def __init__(self, rate_hz: float | None, stopping: threading.Event) -> None:
        self._period_ns = None if rate_hz is None else round(1e9 / rate_hz)
        self._stopping = stopping
        self._next_ns: int | None = None

    def wait(self) -> bool:
        """Sleep until the next tick; ``False`` when stopping was requested meanwhile."""
        if self._period_ns is None:
            return not self._stopping.is_set()
        now = time.monotonic_ns()
        if self._next_ns is None or now - self._next_ns > self._period_ns:
            self._next_ns = now
        delay = (self._next_ns - now) / 1e9
        if delay > 0 and self._stopping.wait(delay):
            return False
        self._next_ns += self._period_ns
        return not self._stopping.is_set()
