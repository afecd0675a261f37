"""A GenICam camera through harvesters: configure, grab, convert, count losses, reconnect.

The grab loop polls the acquirer with a zero wait and sleeps ``poll_interval_s`` between
empty polls: the GenTL wait inside ``fetch`` holds the GIL (genicam 1.6.0), so a blocking
fetch would stall every other Python thread of the daemon for as long as it waits. Each
image is converted (one copy) inside the ``with buffer`` block, so the buffer goes back to
the producer before ``on_frame`` runs.

Deadlines of our own, never the producer's:
- no frame for ``fetch_timeout_s`` counts a timeout; ``max_consecutive_timeouts`` of them
  in a row mean the camera is lost;
- a watchdog thread tears the acquirer down when the grab loop itself has not come back
  from a harvesters call for ``stall_timeout_s`` (a fetch that never returns).
A lost camera is reconnected with exponential backoff: the acquirer is destroyed, a new one
created from the device list, and only when that fails is the device list refreshed
(``Harvester.update()``, or a rebuilt Harvester when the update finds nothing).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from harvesters.core import ImageAcquirer

from defectd.errors import CameraError
from defectd.pipeline.sources.base import (
    EventKind,
    GenICamSourceConfig,
    SourceState,
)
from defectd.pipeline.sources.convert import check_pixel_format, to_output
from defectd.pipeline.sources.gentl import GenTLHub, apply_node, apply_nodes, resolve_producers
from defectd.pipeline.sources.threaded import ThreadedSource

# A fetch with this timeout makes one non-blocking check of the producer's queue.
_POLL_FETCH_TIMEOUT_S = 1e-6
# Lost-frame events (and bad-buffer warnings) are merged so that a slow consumer or a broken
# camera cannot flood the event topic or the log.
_LOST_EVENT_INTERVAL_NS = 1_000_000_000


class _LostError(Exception):
    """The camera stopped delivering; the message says why."""


class GenICamSource(ThreadedSource):
    """One GenICam camera (see ``GenICamSourceConfig``).

    ``hub`` shares one Harvester between the cameras of a station (``make_sources`` makes
    one); without it the source loads its producers itself, which works for a station with
    one GenICam camera per producer.
    """

    def __init__(
        self, config: GenICamSourceConfig, station: str, *, hub: GenTLHub | None = None
    ) -> None:
        super().__init__(config.camera, station, "genicam")
        self.config = config
        self._hub = hub
        self._owns_hub = hub is None
        self._generation = 0
        self.acquirer: ImageAcquirer | None = None  # public so that tests can pull the plug
        self._acq_lock = threading.Lock()
        self._watchdog: threading.Thread | None = None
        self._watchdog_stop = threading.Event()
        # The grab loop's heartbeat: when it last came back from a harvesters call, and where
        # it is now ("device" inside harvesters, "consumer" inside on_frame, "reconnecting",
        # "idle" otherwise). Only "device" silences are stalls the watchdog acts on.
        self._beat_ns = time.monotonic_ns()
        self._phase = "idle"
        self._pixel_format = "Mono8"
        self._requests = 0  # fire_trigger() calls not yet executed (trigger = "request")
        self._requests_lock = threading.Lock()

    def fire_trigger(self, world_key: str | None = None) -> None:
        """Ask for one frame (``trigger = "request"``); the grab thread fires
        ``TriggerSoftware`` (or, with ``request_substitute``, takes the next fresh frame).
        ``world_key`` is ignored: a real camera sees the part. Raises ``CameraError`` when the
        source is not in request mode."""
        if self.config.trigger != "request":
            raise CameraError(f"camera {self.camera!r}: trigger is not 'request'")
        with self._requests_lock:
            self._requests += 1

    def _take_requests(self) -> int:
        with self._requests_lock:
            n, self._requests = self._requests, 0
        return n

    # --- life cycle -------------------------------------------------------------------------

    def _open(self) -> None:
        if self._owns_hub:
            producers = resolve_producers(self.config.producers, camera=self.camera)
            self._hub = GenTLHub(producers, close_when_unused=True)
        assert self._hub is not None
        self._hub.attach()
        try:
            self.acquirer = self._connect()
        except BaseException:
            self._release_hub()
            raise
        self._set_state(SourceState.STREAMING)
        self._watchdog_stop.clear()
        self._watchdog = threading.Thread(
            target=self._watch, name=f"source-{self.camera}-watchdog", daemon=True
        )
        self._watchdog.start()

    def _close(self) -> None:
        self._watchdog_stop.set()
        if self._watchdog is not None:
            self._watchdog.join(2.0)
            self._watchdog = None
        self._drop_acquirer()
        self._release_hub()

    def _release_hub(self) -> None:
        if self._hub is not None:
            self._hub.detach()
            if self._owns_hub:
                self._hub = None

    def _connect(self) -> ImageAcquirer:
        """Open the device, apply the configuration and start acquisition."""
        hub = self._hub
        assert hub is not None
        self._generation = hub.generation
        acquirer = hub.open(self.config.device, self.camera)
        try:
            node_map = acquirer.remote_device.node_map
            apply_nodes(node_map, self.config.nodes, self.camera)
            if self.config.trigger == "software" or (
                self.config.trigger == "request" and not self.config.request_substitute
            ):
                self._arm_software_trigger(node_map)
            if not node_map.has_node("PixelFormat"):
                raise CameraError(f"camera {self.camera!r}: the device has no PixelFormat node")
            self._pixel_format = str(node_map.PixelFormat.value)
            check_pixel_format(self._pixel_format, self.camera)
            acquirer.num_buffers = self.config.num_buffers
            acquirer.start()
        except BaseException:
            hub.release(acquirer)
            raise
        self._log.info(
            "camera_opened",
            device=self.config.device.describe(),
            pixel_format=self._pixel_format,
            width=_node_value(node_map, "Width"),
            height=_node_value(node_map, "Height"),
            rate_hz=_node_value(node_map, "AcquisitionFrameRate"),
            num_buffers=self.config.num_buffers,
        )
        return acquirer

    def _arm_software_trigger(self, node_map: Any) -> None:
        if not all(node_map.has_node(n) for n in ("TriggerMode", "TriggerSoftware")):
            raise CameraError(
                f"camera {self.camera!r}: trigger = 'software' but the device has no "
                f"software trigger (TriggerMode/TriggerSoftware nodes)"
            )
        if node_map.has_node("TriggerSelector") and "FrameStart" in tuple(
            node_map.TriggerSelector.symbolics
        ):
            apply_node(node_map, "TriggerSelector", "FrameStart", self.camera)
        apply_node(node_map, "TriggerMode", "On", self.camera)
        if node_map.has_node("TriggerSource"):
            apply_node(node_map, "TriggerSource", "Software", self.camera)

    def _drop_acquirer(self) -> None:
        with self._acq_lock:
            acquirer, self.acquirer = self.acquirer, None
        if acquirer is not None and self._hub is not None:
            self._hub.release(acquirer)

    # --- grab loop --------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._grab_until_lost()
            except _LostError as lost:
                if self._stopping.is_set():
                    return
                self._reconnect(str(lost))

    def _beat(self, phase: str) -> None:
        self._beat_ns = time.monotonic_ns()
        self._phase = phase

    def _grab_until_lost(self) -> None:
        cfg = self.config
        poll_s = cfg.poll_interval_s
        timeout_ns = round(cfg.fetch_timeout_s * 1e9)
        trigger_period_ns = (
            None if cfg.trigger_rate_hz is None else round(1e9 / cfg.trigger_rate_hz)
        )
        software = cfg.trigger == "software"
        request = cfg.trigger == "request"
        substitute = request and cfg.request_substitute
        outstanding = 0  # requested frames not yet received (request mode)
        last_id: int | None = None
        lost_pending = 0
        lost_emitted_ns = 0
        bad_buffers = 0  # since the last warning about them
        bad_logged_ns = -_LOST_EVENT_INTERVAL_NS
        consecutive_timeouts = 0
        waiting_since = time.monotonic_ns()
        next_trigger_ns = waiting_since
        trigger_pending = False

        while not self._stopping.is_set():
            acquirer = self.acquirer
            if acquirer is None:
                raise _LostError("the acquirer was released")
            now = time.monotonic_ns()
            if software and (
                (trigger_period_ns is None and not trigger_pending)
                or (trigger_period_ns is not None and now >= next_trigger_ns)
            ):
                self._beat("device")
                try:
                    acquirer.remote_device.node_map.TriggerSoftware.execute()
                except Exception as exc:  # any failure of a gone device
                    raise _LostError(f"TriggerSoftware failed: {_why(exc)}") from exc
                trigger_pending = True
                if trigger_period_ns is not None:
                    # Do not make up missed triggers after a stall.
                    next_trigger_ns = max(next_trigger_ns + trigger_period_ns, now)

            if request:
                asked = self._take_requests()
                if asked:
                    if outstanding == 0:
                        waiting_since = now
                    outstanding += asked
                    self._beat("device")
                    try:
                        if substitute:
                            # No TriggerSoftware: drop what is queued, take what comes next.
                            while old := acquirer.try_fetch(timeout=_POLL_FETCH_TIMEOUT_S):
                                last_id = int(old.module.frame_id)  # skipped, not lost
                                old.queue()
                        else:
                            for _ in range(asked):
                                acquirer.remote_device.node_map.TriggerSoftware.execute()
                    except Exception as exc:  # any failure of a gone device
                        raise _LostError(f"TriggerSoftware failed: {_why(exc)}") from exc

            self._beat("device")
            try:
                buffer = acquirer.try_fetch(timeout=_POLL_FETCH_TIMEOUT_S)
            except Exception as exc:  # harvesters raises anything (IndexError...) once gone
                raise _LostError(f"fetch failed: {_why(exc)}") from exc

            if buffer is None:
                self._beat("idle")
                if request and outstanding == 0:
                    waiting_since = now  # an idle line waiting for triggers is no timeout
                elif now - waiting_since >= timeout_ns:
                    consecutive_timeouts += 1
                    waiting_since = now
                    trigger_pending = False  # that trigger is lost; fire the next one
                    outstanding = 0  # the pairing gives those parts error:no_frame
                    self._count(timeouts=1)
                    log = self._log.warning if consecutive_timeouts == 1 else self._log.debug
                    log("fetch_timeout", timeout_s=cfg.fetch_timeout_s, n=consecutive_timeouts)
                    limit = cfg.max_consecutive_timeouts
                    if limit is not None and consecutive_timeouts >= limit:
                        raise _LostError(
                            f"no frame for {consecutive_timeouts} x {cfg.fetch_timeout_s:g} s"
                        )
                if self._stopping.wait(poll_s):
                    return
                continue

            t_host_ns = time.monotonic_ns()
            t_wall = time.time()
            if substitute and outstanding == 0:
                # A free-running frame nobody asked for: skipped, not lost.
                try:
                    last_id = int(buffer.module.frame_id)
                    buffer.queue()
                except Exception as exc:  # the buffer vanished under us: the device is gone
                    raise _LostError(f"re-queueing a buffer failed: {_why(exc)}") from exc
                self._beat("idle")
                continue
            outstanding = max(0, outstanding - 1)
            try:
                with buffer:
                    frame_id, t_camera_ns, pixel_format, image = self._read(buffer)
            except _BadBufferError as bad:
                self._beat("idle")
                self._count(errors=1)
                bad_buffers += 1
                if t_host_ns - bad_logged_ns >= _LOST_EVENT_INTERVAL_NS:
                    self._log.warning("bad_buffers", reason=str(bad), count=bad_buffers)
                    bad_logged_ns, bad_buffers = t_host_ns, 0
                continue
            except Exception as exc:  # the buffer vanished under us: the device is gone
                raise _LostError(f"reading a buffer failed: {_why(exc)}") from exc
            consecutive_timeouts = 0
            waiting_since = t_host_ns
            trigger_pending = False

            # With the substitute the camera runs free and the frames between requests are
            # skipped on purpose: a gap in its ids is no loss.
            if not substitute and last_id is not None and frame_id > last_id + 1:
                gap = frame_id - last_id - 1
                self._count(lost=gap)
                lost_pending += gap
            last_id = frame_id  # a smaller id: the counter wrapped or restarted
            if lost_pending and t_host_ns - lost_emitted_ns >= _LOST_EVENT_INTERVAL_NS:
                self._emit_event(
                    EventKind.FRAMES_LOST,
                    f"{lost_pending} frames lost (gaps in frame ids)",
                    lost=lost_pending,
                )
                lost_pending = 0
                lost_emitted_ns = t_host_ns

            self._beat("consumer")
            self._emit_frame(
                image,
                t_host_ns=t_host_ns,
                t_wall=t_wall,
                pixel_format=pixel_format,
                t_camera_ns=t_camera_ns,
                meta={"frame_id": frame_id},
            )
            self._beat("idle")

    def _read(self, buffer: Any) -> tuple[int, int | None, str, Any]:
        """Frame id, device time, pixel format and the converted image of one buffer."""
        payload = buffer.payload
        if payload is None or not payload.components:
            raise _BadBufferError("buffer without an image component")
        component = payload.components[0]
        pixel_format = str(component.data_format)
        data = component.data
        if data is None:
            raise _BadBufferError("buffer without image data")
        try:
            image = to_output(
                data, component.height, component.width, pixel_format, self.config.channels
            )
        except ValueError as exc:
            raise _BadBufferError(str(exc)) from exc
        module = buffer.module
        frame_id = int(module.frame_id)
        # harvesters falls back to 0 when the producer has no timestamp (viky: always 0).
        stamp = int(buffer.timestamp)
        t_camera_ns = None
        if stamp:
            frequency = int(buffer.timestamp_frequency) or 1_000_000_000
            t_camera_ns = (
                stamp if frequency == 1_000_000_000 else stamp * 1_000_000_000 // frequency
            )
        return frame_id, t_camera_ns, pixel_format, image

    # --- recovery ---------------------------------------------------------------------------

    def _reconnect(self, reason: str) -> None:
        """Tear down and reopen until it works or ``stop`` is called; backoff doubles."""
        self._beat("reconnecting")  # the watchdog leaves a reconnect alone
        self._set_state(SourceState.RECONNECTING, reason)
        self._emit_event(EventKind.CAMERA_LOST, reason)
        self._drop_acquirer()
        backoff = self.config.reconnect_backoff_min_s
        attempt = 0
        while not self._stopping.is_set():
            attempt += 1
            self._emit_event(EventKind.RECONNECTING, f"attempt {attempt}", attempt=attempt)
            if attempt > 1 and self._hub is not None:
                # The device list may be stale (device replugged): enumerate again.
                self._hub.refresh(self._generation)
            try:
                acquirer = self._connect()
            except Exception as exc:  # keep trying: a camera being replugged fails many ways
                self._count(errors=1)
                self._log.warning(
                    "reconnect_failed", attempt=attempt, retry_in_s=backoff, error=_why(exc)
                )
                if self._stopping.wait(backoff):
                    return
                backoff = min(backoff * 2, self.config.reconnect_backoff_max_s)
                continue
            self._beat("idle")
            with self._acq_lock:
                self.acquirer = acquirer
            self._count(reconnects=1)
            self._set_state(SourceState.STREAMING)
            self._emit_event(EventKind.CAMERA_BACK, f"after {attempt} attempt(s)", attempt=attempt)
            return

    def _watch(self) -> None:
        """Tear the acquirer down when the grab loop hangs inside harvesters."""
        stall_ns = round(self.config.stall_timeout_s * 1e9)
        period = min(1.0, self.config.stall_timeout_s / 4)
        reported_consumer = False
        while not self._watchdog_stop.wait(period):
            silent_ns = time.monotonic_ns() - self._beat_ns
            if silent_ns < stall_ns:
                reported_consumer = False
                continue
            if self._phase == "consumer":
                if not reported_consumer:
                    self._log.warning("on_frame_blocked", blocked_s=silent_ns / 1e9)
                    reported_consumer = True
                continue
            if self._phase == "device" and self.acquirer is not None:
                self._log.error("grab_stalled", silent_s=silent_ns / 1e9)
                self._set_state(SourceState.RECONNECTING, "grab loop stalled in the producer")
                # Destroying the acquirer makes the hung call fail; the loop then reconnects.
                self._drop_acquirer()
                self._beat_ns = time.monotonic_ns()


class _BadBufferError(Exception):
    """A delivered buffer that cannot be turned into an image (counted, never reported)."""


def _why(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _node_value(node_map: Any, name: str) -> Any:
    try:
        return getattr(node_map, name).value if node_map.has_node(name) else None
    except Exception:  # informational only
        return None
