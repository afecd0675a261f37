"""The line contract in the daemon: which part each frame shows, and its gate deadline.

``LineIntake`` sits between the cameras and the pipeline. Per camera (``[cameras.line]``):

- ``free-run``: frames go straight to the pipeline; the verdict's gate deadline is ``gate_ms``
  after grab (or none).
- ``plc-trigger``: each trigger received on ``<prefix>/<station>/<camera>/trigger`` is queued
  (``TriggerPairer``); the camera is fired for one part at a time; its frame carries that part
  id into the pipeline. A trigger whose frame does not come within ``frame_timeout_ms`` (or
  whose gate passes before the camera could be fired) gets the verdict ``error:no_frame``;
  frames nobody asked for are counted and reported, not inspected.
- ``hw-counter``: announcements name the camera's frame counter (``CounterPairer``); frames
  wait up to ``frame_timeout_ms`` for theirs. Unpaired announcements get ``error:no_frame``;
  unpaired frames are counted and reported.

Every verdict then gets the part's gate deadline and the trigger's correlation data
(``stamp``), which the publisher turns into the MQTT 5 message expiry and the ``late`` topic.
One thread (``line-<station>``) expires waiting parts every few milliseconds and reports
unpaired frames and parts as events, at most once a second per camera and kind.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from defectd.daemon.config import StationCamera
from defectd.errors import DefectdError
from defectd.log import get_logger
from defectd.pipeline.frame import Frame
from defectd.pipeline.inspection import Inspection, Verdict
from defectd.pipeline.parts import (
    CounterPairer,
    LineConfig,
    PartTicket,
    TriggerError,
    TriggerPairer,
    gate_deadline_for,
    parse_trigger,
)
from defectd.pipeline.runner import PipelineResult
from defectd.pipeline.sources import Source, TriggeredSource
from defectd.publish.triggers import TriggerMessage

log = get_logger(__name__)

TICK_S = 0.005
_EVENT_INTERVAL_S = 1.0
# Where a paired frame keeps its part's ticket on its way through the pipeline.
PART_META = "part"


class LineIntake:
    """Frames in (``on_frame``), triggers in (``on_trigger``), paired frames out (``submit``),
    parts without a frame out as ``error:no_frame`` verdicts (``on_no_frame``).

    ``submit`` and ``on_no_frame`` are called without the intake's lock held; ``publish_event``
    gets ``(kind, fields)``. Thread-safe: cameras, the trigger listener and the tick thread
    call in concurrently.
    """

    def __init__(
        self,
        station: str,
        cameras: Sequence[StationCamera],
        *,
        submit: Callable[[Frame], None],
        on_no_frame: Callable[[Inspection], None],
        publish_event: Callable[[str, dict[str, Any]], None],
    ) -> None:
        self._station = station
        self._lines: dict[str, LineConfig] = {c.camera: c.line for c in cameras}
        self._submit = submit
        self._on_no_frame = on_no_frame
        self._publish_event = publish_event
        self._lock = threading.Lock()
        self._triggered: dict[str, TriggerPairer] = {}
        self._counted: dict[str, CounterPairer[Frame]] = {}
        for camera, line in self._lines.items():
            if line.mode == "plc-trigger":
                self._triggered[camera] = TriggerPairer(line)
            elif line.mode == "hw-counter":
                self._counted[camera] = CounterPairer(line)
        self._sources: dict[str, TriggeredSource] = {}
        self._bad_triggers: Counter[str] = Counter()
        self._mispaired: Counter[str] = Counter()
        self._pending_events: Counter[tuple[str, str]] = Counter()
        self._last_events = 0.0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def cameras_with_triggers(self) -> list[str]:
        """Cameras that listen on their trigger topic (modes ``plc-trigger``, ``hw-counter``)."""
        return [c for c, line in self._lines.items() if line.mode != "free-run"]

    def attach(self, sources: Sequence[Source]) -> None:
        """Know the cameras to fire (those in ``plc-trigger`` mode must be ``TriggeredSource``)."""
        for source in sources:
            if source.camera in self._triggered:
                if not isinstance(source, TriggeredSource):
                    raise DefectdError(
                        f"camera {source.camera!r}: line mode plc-trigger needs a camera that "
                        f"takes frames on request"
                    )
                self._sources[source.camera] = source

    def start(self) -> None:
        """Start the tick thread (expiry of waiting parts, event reports)."""
        if not (self._triggered or self._counted) or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"line-{self._station}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the tick thread; every part still waiting gets ``error:no_frame``."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(2.0)
        now_ns = time.monotonic_ns()
        given_up: list[PartTicket] = []
        with self._lock:
            for pairer in self._triggered.values():
                given_up += pairer.drain()
            for counted in self._counted.values():
                left = counted.drain()
                given_up += left.tickets
                self._note_unpaired_frames(left.frames)
        self._no_frames(given_up, now_ns, "the station stopped before its frame")
        self._flush_events(force=True)

    def stats(self) -> dict[str, dict[str, int]]:
        """Per camera with a line mode: announced, duplicates, paired, no_frame,
        unpaired_frames, bad_triggers, mispaired (simulated cameras only)."""
        with self._lock:
            out: dict[str, dict[str, int]] = {}
            pairers: list[tuple[str, Any]] = [*self._triggered.items(), *self._counted.items()]
            for camera, pairer in pairers:
                out[camera] = {
                    **pairer.counts.as_dict(),
                    "bad_triggers": self._bad_triggers[camera],
                    "mispaired": self._mispaired[camera],
                }
            return out

    # --- triggers -------------------------------------------------------------------------

    def on_trigger(self, msg: TriggerMessage) -> None:
        """A trigger from the listener: pair it, fire the camera when it is its turn."""
        line = self._lines.get(msg.camera)
        if line is None or line.mode == "free-run":
            log.warning("trigger_for_unknown_camera", camera=msg.camera)
            return
        try:
            ticket = parse_trigger(
                msg.payload,
                camera=msg.camera,
                now_wall=msg.t_wall,
                now_ns=msg.t_ns,
                correlation_data=msg.correlation_data,
                response_topic=msg.response_topic,
            )
        except TriggerError as exc:
            with self._lock:
                self._bad_triggers[msg.camera] += 1
            log.error("bad_trigger", camera=msg.camera, error=str(exc))
            self._publish_event("bad_trigger", {"camera": msg.camera, "error": str(exc)})
            return
        log.debug(
            "part_announced",
            camera=msg.camera,
            part_id=ticket.part_id,
            recipe=ticket.recipe,
            counter=ticket.counter,
            gate_in_ms=(
                None
                if ticket.gate_deadline is None
                else round((ticket.gate_deadline - msg.t_wall) * 1000, 1)
            ),
        )
        if ticket.gate_deadline is not None and ticket.gate_deadline <= msg.t_wall:
            # Its part is past the gate already: a verdict could only be late.
            with self._lock:
                self._pending_events[(msg.camera, "trigger_after_gate")] += 1
            log.warning("trigger_after_gate", camera=msg.camera, part_id=ticket.part_id)
            return
        pushed: list[PartTicket] = []
        frame: Frame | None = None
        with self._lock:
            pairer = self._triggered.get(msg.camera)
            if pairer is not None:
                out = pairer.offer(ticket)
                if out is None:
                    self._pending_events[(msg.camera, "duplicate_trigger")] += 1
                    return
                pushed = out
                self._fire_next(msg.camera, pairer)
            else:
                try:
                    pair, left = self._counted[msg.camera].announce(ticket, msg.t_ns)
                except TriggerError as exc:
                    self._bad_triggers[msg.camera] += 1
                    log.error("bad_trigger", camera=msg.camera, error=str(exc))
                    return
                pushed = left.tickets
                self._note_unpaired_frames(left.frames)
                if pair is not None:
                    frame = self._paired(pair[1], pair[0])
        self._no_frames(pushed, msg.t_ns, "more parts waiting than line.max_pending")
        if frame is not None:
            self._submit(frame)

    def _fire_next(self, camera: str, pairer: TriggerPairer) -> None:
        """Fire the camera for the next waiting part (lock held)."""
        ticket = pairer.to_fire()
        source = self._sources.get(camera)
        if ticket is None or source is None:
            return
        pairer.fired(ticket.part_id, time.monotonic_ns())
        try:
            source.fire_trigger(ticket.part_id)
        except DefectdError as exc:  # the expiry gives the part error:no_frame
            log.error("trigger_fire_failed", camera=camera, part_id=ticket.part_id, error=str(exc))

    # --- frames ---------------------------------------------------------------------------

    def on_frame(self, frame: Frame) -> None:
        """A camera's ``on_frame``: name the frame's part and hand it to the pipeline."""
        camera = frame.camera
        if camera in self._triggered:
            with self._lock:
                pairer = self._triggered[camera]
                ticket = pairer.claim(frame.t_host_ns)
                if ticket is None:
                    self._note_unpaired_frames([frame])
                    return
                truth = frame.meta.get("truth_part_id")
                if truth is not None and truth != ticket.part_id:
                    self._mispaired[camera] += 1
                    log.error("part_mispaired", camera=camera, part_id=ticket.part_id, imaged=truth)
                    self._publish_event(
                        "part_mispaired",
                        {"camera": camera, "part_id": ticket.part_id, "imaged": truth},
                    )
                self._fire_next(camera, pairer)
            self._submit(self._paired(frame, ticket))
            return
        counted = self._counted.get(camera)
        if counted is None:
            gate_ms = self._lines[camera].gate_ms if camera in self._lines else None
            if gate_ms is not None:
                frame.deadline_ns = frame.t_host_ns + round(gate_ms * 1e6)
            self._submit(frame)
            return
        counter = frame.meta.get("frame_id")
        if not isinstance(counter, int):
            with self._lock:
                self._note_unpaired_frames([frame])
            return
        with self._lock:
            pair, left = counted.frame(counter, frame, time.monotonic_ns())
            self._note_unpaired_frames(left.frames)
        self._no_frames(left.tickets, time.monotonic_ns(), "more parts than line.max_pending")
        if pair is not None:
            self._submit(self._paired(pair[1], pair[0]))

    def stamp(self, result: PipelineResult) -> Inspection:
        """The verdict of ``result`` with its part's gate deadline and correlation data."""
        ins = result.inspection
        ticket = result.frame.meta.get(PART_META)
        line = self._lines.get(ins.camera)
        gate_ms = line.gate_ms if line is not None else None
        if not isinstance(ticket, PartTicket):
            ticket = None
        deadline = gate_deadline_for(ticket, ins.t_grab_wall, gate_ms)
        if ticket is None and deadline is None:
            return ins
        return dataclasses.replace(
            ins,
            gate_deadline=deadline,
            correlation=None if ticket is None else ticket.correlation_hex,
            response_topic=None if ticket is None else ticket.response_topic,
        )

    def _paired(self, frame: Frame, ticket: PartTicket) -> Frame:
        """``frame`` named for its part, with the part's gate as the pipeline's deadline."""
        frame.part_id = ticket.part_id
        frame.meta[PART_META] = ticket
        gate = gate_deadline_for(ticket, frame.t_wall, self._lines[ticket.camera].gate_ms)
        if gate is not None:
            frame.deadline_ns = frame.t_host_ns + round((gate - frame.t_wall) * 1e9)
        return frame

    # --- expiry and reports ---------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.wait(TICK_S):
            now_ns = time.monotonic_ns()
            now_wall = time.time()
            given_up: list[PartTicket] = []
            with self._lock:
                for camera, pairer in self._triggered.items():
                    expired = pairer.expire(now_ns, now_wall)
                    if expired:
                        given_up += expired
                        self._fire_next(camera, pairer)
                for counted in self._counted.values():
                    left = counted.expire(now_ns)
                    given_up += left.tickets
                    self._note_unpaired_frames(left.frames)
            self._no_frames(given_up, now_ns, "no frame in time")
            self._flush_events()

    def _note_unpaired_frames(self, frames: Sequence[Frame]) -> None:
        """Count frames no part claimed (lock held); reported by ``_flush_events``."""
        for frame in frames:
            self._pending_events[(frame.camera, "unpaired_frames")] += 1

    def _no_frames(self, tickets: Sequence[PartTicket], now_ns: int, why: str) -> None:
        for ticket in tickets:
            line = self._lines[ticket.camera]
            waited_ms = (now_ns - (ticket.fired_ns or ticket.t_received_ns)) / 1e6
            ins = Inspection(
                station=self._station,
                camera=ticket.camera,
                seq=-1,
                verdict=Verdict.ERROR,
                rule="error:no_frame",
                reason=(
                    f"no_frame: {why} (waited {waited_ms:.0f} ms, "
                    f"line.frame_timeout_ms {line.frame_timeout_ms:g})"
                ),
                part_id=ticket.part_id,
                t_grab_wall=ticket.t_received_wall,
                t_grab_ns=ticket.t_received_ns,
                latencies_ms={"total": round(waited_ms, 3)},
                gate_deadline=gate_deadline_for(ticket, ticket.t_received_wall, line.gate_ms),
                correlation=ticket.correlation_hex,
                response_topic=ticket.response_topic,
            )
            with self._lock:
                kind = "unpaired_announcements" if line.mode == "hw-counter" else "no_frame"
                self._pending_events[(ticket.camera, kind)] += 1
            self._on_no_frame(ins)

    def _flush_events(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_events < _EVENT_INTERVAL_S:
            return
        with self._lock:
            self._last_events = now
            pending, self._pending_events = self._pending_events, Counter()
        for (camera, kind), count in sorted(pending.items()):
            log.warning(kind, camera=camera, count=count)
            self._publish_event(kind, {"camera": camera, "count": count})
