"""The station's health as a pure function of what its parts report: inputs -> report.

``HealthInputs`` is a snapshot the service gathers (progress counters, camera health,
publisher stats, engine identity, its own flags); ``check_progress`` gives the watchdog
condition and ``health_report`` the ``/healthz`` answer. Neither reads a clock, a lock or a
socket, so every rule below is tested with plain values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from defectd.daemon.config import DaemonSection
from defectd.daemon.health import HealthReport
from defectd.daemon.routing import ProgressSnapshot
from defectd.daemon.telemetry import EngineInfo
from defectd.pipeline.sources import SourceHealth, SourceState
from defectd.publish.mqtt import PublisherStats


@dataclass(frozen=True, slots=True)
class HealthInputs:
    """Everything the health rules look at, taken at ``now`` (monotonic seconds).

    ``started`` is when the service started (a camera that never delivered a frame is
    silent since then); ``publisher`` is None before the publisher starts; ``disks`` maps the
    directories the daemon writes (state, outbox, archive, cache) to their free bytes.
    """

    now: float
    started: float
    ready: bool
    shutting_down: bool
    progress: ProgressSnapshot
    sources: Sequence[SourceHealth]
    publisher: PublisherStats | None
    engine: EngineInfo | None
    reloads: int
    daemon: DaemonSection
    disks: Mapping[str, int] = field(default_factory=dict)
    # The line contract: pairing counters per camera with a line mode, and whether the PLC's
    # triggers can arrive (None: no camera takes triggers).
    line: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    triggers_connected: bool | None = None


def durability_problem(p: PublisherStats) -> str | None:
    """Why verdicts are not durable now (None when they are): the outbox cannot store them,
    or it is damaged. The station then must not claim health: not ready, no watchdog."""
    if p.store_failing:
        return (
            f"verdicts are not stored durably ({p.store_error}); {p.not_durable} were sent "
            "directly as fail-safe rejects (not_durable)"
        )
    if p.outbox_fault == "damaged":
        return f"the outbox is damaged: {p.outbox_fault_detail}"
    return None


def check_progress(inputs: HealthInputs) -> tuple[bool, str]:
    """Whether the pipeline makes progress (the watchdog condition), and if not, why.

    Stuck: verdicts that cannot be stored durably (``durability_problem``); frames in flight
    while the model has inspected none for ``stall_timeout_s``; a camera in ``failed`` state;
    a streaming camera silent for ``camera_stall_s`` (unless ``camera_idle_ok``).
    """
    if inputs.publisher is not None:
        problem = durability_problem(inputs.publisher)
        if problem is not None:
            return False, problem
    d = inputs.daemon
    p = inputs.progress
    idle = inputs.now - max(p.last_inspected, p.epoch)
    if p.in_flight > 0 and idle > d.stall_timeout_s:
        return (
            False,
            f"pipeline stuck: {p.in_flight} frames in flight, none inspected for {idle:.1f} s",
        )
    for h in inputs.sources:
        if h.state is SourceState.FAILED:
            return False, f"camera {h.camera} failed: {h.detail}"
        if h.state is SourceState.STREAMING and not d.camera_idle_ok:
            age = (
                h.last_frame_age_s
                if h.last_frame_age_s is not None
                else inputs.now - inputs.started
            )
            if age > d.camera_stall_s:
                return False, f"camera {h.camera} delivered no frame for {age:.0f} s"
    return True, ""


def health_report(inputs: HealthInputs) -> HealthReport:
    """``/healthz``: live = making progress and storing verdicts durably; ready = live, frames
    flow, cameras streaming, the inference server answering (a ``triton`` engine), broker
    connected and acknowledging (the oldest unacknowledged
    result younger than ``daemon.max_result_age_s``), outbox without a fault and clear of its
    bound. ``reasons`` says what is missing."""
    live, why = check_progress(inputs)
    reasons: list[str] = []
    if not inputs.ready:
        reasons.append("starting: no frame inspected yet")
    if inputs.shutting_down:
        reasons.append("shutting down")
    if not live:
        reasons.append(why)
    cameras: dict[str, Any] = {}
    for h in inputs.sources:
        cameras[h.camera] = {
            "state": h.state.value,
            "fps": h.fps,
            "frames": h.frames,
            "lost": h.lost,
            "reconnects": h.reconnects,
            "last_frame_age_s": h.last_frame_age_s,
            "detail": h.detail,
        }
        if h.state is not SourceState.STREAMING:
            reasons.append(f"camera {h.camera} is {h.state.value}")
    broker: dict[str, Any] = {"connected": False}
    outbox: dict[str, Any] = {}
    p = inputs.publisher
    if p is not None:
        broker = {"connected": p.connected, "last_error": p.last_error}
        outbox = {"depth": p.outbox_depth, "oldest_age_s": p.oldest_age_s}
        outbox["near_bound"] = p.near_bound
        outbox["oldest_result_age_s"] = p.oldest_result_age_s
        outbox["fault"] = p.outbox_fault
        outbox["not_durable"] = p.not_durable
        outbox["free_bytes"] = p.outbox_free_bytes
        if not p.connected:
            reasons.append("broker not connected (results wait in the outbox)")
        age = p.oldest_result_age_s
        limit = inputs.daemon.max_result_age_s
        if p.connected and age is not None and age > limit:
            reasons.append(
                f"oldest unacknowledged result is {age:.0f} s old (limit {limit:g} s):"
                " the broker is hung or slow"
            )
        if p.outbox_fault is not None and p.outbox_fault != "damaged" and not p.store_failing:
            reasons.append(f"outbox fault {p.outbox_fault}: {p.outbox_fault_detail}")
        if p.near_bound:
            reasons.append("outbox near its bound")
    server = inputs.engine.server if inputs.engine is not None else None
    if server is not None and not server.reachable:
        reasons.append(
            f"inference server {server.url} not answering for {server.down_for_s:.1f} s "
            f"({server.detail}): frames get error verdicts until it is back"
        )
    last = inputs.progress.last_inspected
    checks = {
        "cameras": cameras,
        "engine": None if inputs.engine is None else asdict(inputs.engine),
        "broker": broker,
        "outbox": outbox,
        "progress": {
            "last_inspected_age_s": round(inputs.now - last, 3) if last else None,
            "in_flight": inputs.progress.in_flight,
            "results": inputs.progress.results,
        },
        "reloads": inputs.reloads,
        "disks": dict(inputs.disks),
    }
    if inputs.triggers_connected is not None:
        checks["line"] = {
            "triggers_connected": inputs.triggers_connected,
            "cameras": {camera: dict(counts) for camera, counts in inputs.line.items()},
        }
        if not inputs.triggers_connected:
            reasons.append("PLC trigger subscriber not connected (parts get no verdict)")
    return HealthReport(live=live, ready=not reasons, reasons=tuple(reasons), checks=checks)
