"""The health rules as a pure function: a snapshot of the station's parts in, a report out."""

from __future__ import annotations

from dataclasses import replace

from defectd.daemon.config import DaemonSection
from defectd.daemon.health_report import HealthInputs, check_progress, health_report
from defectd.daemon.routing import ProgressSnapshot
from defectd.pipeline.sources import SourceHealth, SourceState


def _camera(state: SourceState = SourceState.STREAMING, age: float | None = 0.1) -> SourceHealth:
    return SourceHealth("cam0", state, 100, 0, 0, 0, 0, 20.0, age, "")


def _inputs(**changes: object) -> HealthInputs:
    base = HealthInputs(
        now=100.0,
        started=0.0,
        ready=True,
        shutting_down=False,
        progress=ProgressSnapshot(submitted=50, results=50, inspected=50, last_inspected=99.9),
        sources=[_camera()],
        publisher=None,
        engine=None,
        reloads=0,
        daemon=DaemonSection(stall_timeout_s=2.0, camera_stall_s=5.0),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_frames_in_flight_with_nothing_inspected_past_the_stall_timeout_is_not_live() -> None:
    stuck = ProgressSnapshot(submitted=60, results=50, inspected=50, last_inspected=97.0)
    live, why = check_progress(_inputs(progress=stuck))
    assert not live
    assert why == "pipeline stuck: 10 frames in flight, none inspected for 3.0 s"


def test_a_new_generation_restarts_the_stall_clock() -> None:
    reloaded = ProgressSnapshot(submitted=60, results=50, last_inspected=90.0, epoch=99.0)
    assert check_progress(_inputs(progress=reloaded)) == (True, "")


def test_a_silent_or_failed_camera_stops_progress() -> None:
    assert not check_progress(_inputs(sources=[_camera(age=6.0)]))[0]
    assert not check_progress(_inputs(sources=[_camera(SourceState.FAILED)]))[0]
    quiet_ok = _inputs(sources=[_camera(age=60.0)], daemon=DaemonSection(camera_idle_ok=True))
    assert check_progress(quiet_ok)[0]


def test_report_names_every_reason_it_is_not_ready() -> None:
    report = health_report(_inputs())
    assert report.live and report.ready and report.reasons == ()
    starting = health_report(_inputs(ready=False, shutting_down=True))
    assert "starting: no frame inspected yet" in starting.reasons
    assert "shutting down" in starting.reasons
    assert (
        "camera cam0 is failed"
        in health_report(_inputs(sources=[_camera(SourceState.FAILED)])).reasons
    )
    assert starting.checks["progress"] == {
        "last_inspected_age_s": 0.1,
        "in_flight": 0,
        "results": 50,
    }


def test_a_station_whose_plc_triggers_cannot_arrive_is_not_ready() -> None:
    counts = {"cam0": {"paired": 10, "no_frame": 1, "unpaired_frames": 0}}
    up = health_report(_inputs(triggers_connected=True, line=counts))
    assert up.ready and up.checks["line"] == {"triggers_connected": True, "cameras": counts}
    down = health_report(_inputs(triggers_connected=False, line=counts))
    assert not down.ready and down.live
    assert "PLC trigger subscriber not connected (parts get no verdict)" in down.reasons
    assert "line" not in health_report(_inputs()).checks  # no camera takes triggers
