"""The service life cycle: ``serve()`` = ``startup()`` -> ``main_loop()`` -> ``shutdown()``.

- ``startup``: load and warm up the engine, read the cameras' calibration, start the publisher
  (an unreachable broker is not fatal: results wait in the durable outbox), the archive, the
  pipeline, the health endpoint, and last the cameras (intake).
- ``main_loop`` (main thread, ticks every 100 ms): READY=1 once the model has inspected a
  frame; WATCHDOG=1 only while the pipeline makes progress; STATUS= every few seconds;
  SIGHUP starts a reload on its own thread.
- ``shutdown`` (SIGTERM/SIGINT): STOPPING=1, stop the cameras, drain the frames in flight
  within ``daemon.drain_timeout_s``, flush the outbox, publish ``offline``, exit 0.

Signal handlers only set flags; a second SIGTERM/SIGINT exits at once (``EXIT_FORCED``) —
every verdict handed to the publisher is already durable in the outbox.

A reload builds a whole new generation (engine opened and warmed up, calibration re-read,
new pipeline started) while the old one keeps inspecting, then switches the cameras' intake
to it under a lock and drains the old one: no frame is dropped and every verdict names the
model that made it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from defectd import __version__
from defectd.daemon.archive import Archive
from defectd.daemon.config import StationConfig, load_station_config
from defectd.daemon.health import HealthReport, HealthServer
from defectd.daemon.logs import RateLimit, install_rate_limit
from defectd.daemon.sdnotify import SdNotifier
from defectd.daemon.station import LoadedModel, camera_setups, load_model
from defectd.daemon.telemetry import EngineInfo, StationMetrics, error_reason
from defectd.errors import ConfigError, DefectdError
from defectd.log import get_logger
from defectd.pipeline.cameras import CameraSetup
from defectd.pipeline.frame import Frame
from defectd.pipeline.inspection import Inspection, Verdict
from defectd.pipeline.runner import Pipeline, PipelineResult
from defectd.pipeline.sources import (
    Source,
    SourceEvent,
    SourceHealth,
    SourceState,
    make_sources,
)
from defectd.pipeline.stats import PipelineStats
from defectd.publish.messages import StatusInfo
from defectd.publish.mqtt import Publisher

log = get_logger(__name__)

EXIT_OK = 0
EXIT_FORCED = 1
TICK_S = 0.1
# Error verdicts that say nothing about whether the model runs: they are given without it.
_NOT_PROGRESS = frozenset({"queue_full", "deadline", "stopped"})

ResultObserver = Callable[[PipelineResult], None]


@dataclass(frozen=True, slots=True)
class Generation:
    """What one (re)load built: the config in force, its model and its pipeline."""

    config: StationConfig
    model: LoadedModel
    pipeline: Pipeline


def merge_reload(old: StationConfig, new: StationConfig) -> tuple[StationConfig, list[str]]:
    """The config a reload applies, and the keys that changed but need a restart.

    A reload applies ``model``, ``pipeline``, ``postprocess``, ``rules`` and each camera's
    ``calibration``, ``roi`` and ``ignore_zones``. The station id, the camera sources, MQTT,
    outbox, archive, health and daemon settings keep their running values.
    """
    ignored = [
        key
        for key in ("station", "mqtt", "outbox", "archive", "health", "daemon")
        if getattr(old, key) != getattr(new, key)
    ]
    cameras = old.cameras
    if [c.camera for c in old.cameras] != [c.camera for c in new.cameras]:
        ignored.append("cameras")
    else:
        if [c.source for c in old.cameras] != [c.source for c in new.cameras]:
            ignored.append("cameras (sources)")
        cameras = tuple(
            o.model_copy(
                update={"calibration": n.calibration, "roi": n.roi, "ignore_zones": n.ignore_zones}
            )
            for o, n in zip(old.cameras, new.cameras, strict=True)
        )
    merged = old.model_copy(
        update={
            "model": new.model,
            "pipeline": new.pipeline,
            "postprocess": new.postprocess,
            "rules": new.rules,
            "cameras": cameras,
        }
    )
    return merged, ignored


class Service:
    """The daemon. ``serve()`` runs it to the end and returns the exit code.

    Tests and ``defectd demo`` pass ``observers`` (called with every result, from pipeline
    threads), ``on_tick`` (called from the main loop), ``max_runtime_s`` (counted from
    ready) or ``stop_after_results`` to end it without a signal.
    """

    def __init__(
        self,
        config: StationConfig,
        *,
        config_path: Path | None = None,
        notifier: SdNotifier | None = None,
        hang_file: Path | None = None,
        observers: Sequence[ResultObserver] = (),
        on_tick: Callable[[Service], None] | None = None,
        max_runtime_s: float | None = None,
        stop_after_results: int | None = None,
        install_signals: bool = True,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.notifier = notifier if notifier is not None else SdNotifier()
        self.metrics = StationMetrics(config.station)
        self.metrics.registry.add_collector(self._collect)
        self.should_exit = False
        self.reload_requested = False
        self._hang_file = hang_file
        self._observers = tuple(observers)
        self._on_tick = on_tick
        self._max_runtime_s = max_runtime_s
        self._stop_after = stop_after_results
        self._install_signals = install_signals
        self._rate_limit = RateLimit(config.daemon.log_rate_limit_s, config.daemon.log_burst)

        self._gen: Generation | None = None
        self._gen_lock = threading.Lock()  # intake vs switch to a new generation
        self._publisher: Publisher | None = None
        self._archive: Archive | None = None
        self._health: HealthServer | None = None
        self._sources: list[Source] = []
        self._reload_thread: threading.Thread | None = None
        self._ledger: int | None = None

        self._count_lock = threading.Lock()
        self._submitted = 0
        self._results = 0
        self._inspected = 0
        self._verdicts: dict[str, int] = {v.value: 0 for v in Verdict}
        self._t_start = time.monotonic()
        self._last_inspected = 0.0
        self._progress_epoch = 0.0
        self._ready = False
        self._t_ready = 0.0
        self.outbox_left: int | None = None
        self.final_stats: PipelineStats | None = None
        self._stalled = False
        self._next_ping = 0.0
        self._next_status = 0.0
        self._reloads = 0

    # ------------------------------------------------------------------ life cycle

    def serve(self) -> int:
        """Start, run until a signal (or a limit), stop cleanly; returns the exit code.

        Raises a ``DefectdError`` (after releasing what was started) when startup fails.
        """
        saved: dict[int, Any] = {}
        if self._install_signals and threading.current_thread() is threading.main_thread():
            saved = self._install_signal_handlers()
        try:
            try:
                self.startup()
            except BaseException:
                self.shutdown(startup_failed=True)
                raise
            try:
                if not self.should_exit:
                    self.main_loop()
            finally:
                self.shutdown()
        finally:
            for signum, handler in saved.items():
                signal.signal(signum, handler)
        return EXIT_OK

    def startup(self) -> None:
        cfg = self.config
        self._t_start = self._progress_epoch = time.monotonic()
        install_rate_limit(self._rate_limit)
        log.info(
            "starting",
            station=cfg.station,
            version=__version__,
            config=str(cfg.source_path),
            state_dir=str(cfg.state_dir),
            cameras=[c.camera for c in cfg.cameras],
        )
        try:
            cfg.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"daemon.state_dir: cannot create {cfg.state_dir}: {exc}") from None
        self.notifier.status("loading the model")
        model = load_model(cfg, hang_file=self._hang_file)
        try:
            setups = camera_setups(cfg)
            pipeline = self._make_pipeline(cfg, model, setups)
        except BaseException:
            model.engine.close()
            raise
        self._gen = Generation(cfg, model, pipeline)
        if self.should_exit:
            return

        if cfg.daemon.result_ledger is not None:
            try:
                cfg.daemon.result_ledger.parent.mkdir(parents=True, exist_ok=True)
                self._ledger = os.open(
                    cfg.daemon.result_ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640
                )
            except OSError as exc:
                raise ConfigError(
                    f"daemon.result_ledger: cannot open {cfg.daemon.result_ledger}: {exc}"
                ) from None
        self._publisher = Publisher(cfg.mqtt, cfg.outbox, cfg.station, status=self._status_info())
        self._publisher.start()
        if cfg.archive.enabled:
            self._archive = Archive(cfg.archive)
            self._archive.start()
        pipeline.start()
        if cfg.health.enabled:
            self._health = HealthServer(cfg.health.address, self.health_report, self.scrape)
            self._health.start()
        if self.should_exit:
            return

        self.notifier.status("opening cameras")
        # GenICam cameras of one station share one producer hub.
        for source in make_sources([c.source for c in cfg.cameras], cfg.station):
            source.start(self._on_frame, self._on_event)
            self._sources.append(source)
        self._progress_epoch = time.monotonic()
        self.notifier.status("waiting for the first frame")
        log.info("started", model=model.card.name, engine=model.engine.name)

    def main_loop(self) -> None:
        while not self.should_exit:
            time.sleep(TICK_S)
            if self.reload_requested and self._reload_thread is None:
                self.reload_requested = False
                self._start_reload()
            if self._reload_thread is not None and not self._reload_thread.is_alive():
                self._reload_thread = None
            self._tick(time.monotonic())

    def shutdown(self, *, startup_failed: bool = False) -> None:
        """Stop intake, drain, flush, publish ``offline``; every step bounded in time."""
        cfg = self.config
        end = time.monotonic() + cfg.daemon.drain_timeout_s

        def left() -> float:
            return max(0.0, end - time.monotonic())

        self.notifier.stopping("draining" if not startup_failed else "start failed")
        if not startup_failed:
            log.info(
                "stopping", in_flight=self.in_flight, drain_timeout_s=cfg.daemon.drain_timeout_s
            )
        for source in self._sources:
            source.stop(timeout=min(5.0, max(left(), 0.5)))
        if self._reload_thread is not None:
            self._reload_thread.join(left())
        drained = True
        gen = self._gen
        if gen is not None:
            if gen.pipeline.stats().running:
                drained = gen.pipeline.drain(left())
                self.final_stats = gen.pipeline.stats()
                gen.pipeline.stop(timeout=max(left(), 0.5))
            gen.model.engine.close()
        if self._archive is not None:
            self._archive.stop(timeout=min(max(left(), 0.5), 5.0))
        depth: int | None = None
        if self._publisher is not None:
            self._publisher.stop(drain_timeout_s=max(left(), 1.0))
            depth = self.outbox_left = self._publisher.stats().outbox_depth
        if self._ledger is not None:
            os.close(self._ledger)
            self._ledger = None
        if self._health is not None:
            self._health.stop()
        if not startup_failed:
            log.info(
                "stopped",
                drained=drained,
                results=self._results,
                outbox_left=depth,
                verdicts=dict(self._verdicts),
            )
        self.notifier.close()

    # ------------------------------------------------------------------ signals

    def _install_signal_handlers(self) -> dict[int, Any]:
        """Install ours; returns the previous handlers (restored when ``serve`` returns)."""
        saved: dict[int, Any] = {}
        for signum, handler in (
            (signal.SIGTERM, self._handle_exit),
            (signal.SIGINT, self._handle_exit),
            (signal.SIGHUP, self._handle_reload),
        ):
            saved[signum] = signal.signal(signum, handler)
        return saved

    def _handle_exit(self, signum: int, frame: FrameType | None) -> None:
        if self.should_exit:
            # Logging here could deadlock on the stream lock the main thread holds.
            os.write(2, b'{"event": "forced_exit", "level": "warning"}\n')
            os._exit(EXIT_FORCED)
        self.should_exit = True

    def _handle_reload(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True

    # ------------------------------------------------------------------ intake and results

    def _make_pipeline(
        self, cfg: StationConfig, model: LoadedModel, setups: dict[str, CameraSetup]
    ) -> Pipeline:
        return Pipeline(
            model.engine,
            model.card,
            cfg.pipeline,
            on_result=self._on_result,
            postprocess=cfg.postprocess,
            rules=cfg.rules,
            cameras=setups,
        )

    def _on_frame(self, frame: Frame) -> None:
        self.metrics.frames.inc(camera=frame.camera)
        with self._count_lock:
            self._submitted += 1
        with self._gen_lock:
            gen = self._gen
            assert gen is not None
            gen.pipeline.submit(frame)

    def _on_event(self, event: SourceEvent) -> None:
        self.metrics.camera_events.inc(camera=event.camera, kind=event.kind)
        log.warning("camera_event", camera=event.camera, kind=event.kind, detail=event.detail)
        if self._publisher is not None:
            try:
                self._publisher.publish_event(event.kind, camera=event.camera, detail=event.detail)
            except DefectdError as exc:
                log.error("event_not_published", kind=event.kind, error=str(exc))

    def _on_result(self, result: PipelineResult) -> None:
        ins = result.inspection
        commit_ms: float | None = None
        if self._publisher is not None:
            t0 = time.perf_counter_ns()
            try:
                self._publisher.submit(ins)
                commit_ms = (time.perf_counter_ns() - t0) / 1e6
            except DefectdError as exc:
                self.metrics.errors.inc(reason="publish")
                log.error("result_not_stored", camera=ins.camera, seq=ins.seq, error=str(exc))
            else:
                self._append_ledger(ins)
        self.metrics.observe(ins, commit_ms)
        inspected = ins.verdict is not Verdict.ERROR or error_reason(ins) not in _NOT_PROGRESS
        with self._count_lock:
            self._results += 1
            self._verdicts[ins.verdict.value] += 1
            if inspected:
                self._inspected += 1
                self._last_inspected = time.monotonic()
        self._log_result(ins)
        if self._archive is not None:
            meta = result.frame.meta
            self._archive.submit(
                ins,
                result.frame.image,
                result.mask,
                truth=meta.get("truth_mask"),
                truth_kinds=meta.get("truth_kinds") or (),
            )
        for observer in self._observers:
            try:
                observer(result)
            except Exception as exc:  # an observer must not cost a verdict
                log.warning("result_observer_failed", error=repr(exc))

    def _append_ledger(self, ins: Inspection) -> None:
        if self._ledger is None:
            return
        try:
            # One write on an O_APPEND descriptor: whole lines, even across a SIGKILL.
            os.write(self._ledger, f"{ins.result_id}\n".encode())
        except OSError as exc:
            self.metrics.errors.inc(reason="ledger")
            log.error("ledger_write_failed", camera=ins.camera, seq=ins.seq, error=str(exc))

    def _log_result(self, ins: Inspection) -> None:
        fields: dict[str, Any] = {
            "station": ins.station,
            "camera": ins.camera,
            "seq": ins.seq,
            "part_id": ins.part_id,
            "result_id": ins.result_id,
            "verdict": ins.verdict.value,
            "latency_ms": ins.latencies_ms.get("total"),
            "model": ins.model_name,
        }
        if ins.verdict is Verdict.PASS:
            log.debug("inspection", **fields)
        elif ins.verdict is Verdict.FAIL:
            log.info("inspection", rule=ins.rule, defects=len(ins.defects), **fields)
        else:
            log.warning("inspection_error", reason=error_reason(ins), detail=ins.reason, **fields)

    # ------------------------------------------------------------------ progress and systemd

    def pipeline_stats(self) -> PipelineStats | None:
        """The current pipeline's counters, queue depths, fps and latency percentiles."""
        gen = self._gen
        return gen.pipeline.stats() if gen is not None else None

    @property
    def in_flight(self) -> int:
        with self._count_lock:
            return self._submitted - self._results

    @property
    def ready(self) -> bool:
        return self._ready

    def progress(self, now: float | None = None) -> tuple[bool, str]:
        """Whether the pipeline makes progress (the watchdog condition), and if not, why.

        Stuck: frames in flight while the model has inspected none for ``stall_timeout_s``;
        a camera in ``failed`` state; a streaming camera silent for ``camera_stall_s``
        (unless ``camera_idle_ok``).
        """
        now = time.monotonic() if now is None else now
        d = self.config.daemon
        with self._count_lock:
            in_flight = self._submitted - self._results
            last = max(self._last_inspected, self._progress_epoch)
        idle = now - last
        if in_flight > 0 and idle > d.stall_timeout_s:
            return (
                False,
                f"pipeline stuck: {in_flight} frames in flight, none inspected for {idle:.1f} s",
            )
        for h in self._source_health():
            if h.state is SourceState.FAILED:
                return False, f"camera {h.camera} failed: {h.detail}"
            if h.state is SourceState.STREAMING and not d.camera_idle_ok:
                age = h.last_frame_age_s if h.last_frame_age_s is not None else now - self._t_start
                if age > d.camera_stall_s:
                    return False, f"camera {h.camera} delivered no frame for {age:.0f} s"
        return True, ""

    def _tick(self, now: float) -> None:
        if not self._ready and self._inspected > 0:
            self._ready = True
            self._t_ready = now
            line = self.status_line()
            self.notifier.ready(line)
            log.info("ready", status=line, startup_s=round(now - self._t_start, 3))
        ok, why = self.progress(now)
        if ok and self._stalled:
            self._stalled = False
            log.info("progress_resumed")
        elif not ok and not self._stalled:
            self._stalled = True
            log.error("watchdog_withheld", reason=why)
        interval = self.notifier.watchdog_interval_s
        if interval is not None and self._ready and ok and now >= self._next_ping:
            self.notifier.watchdog()
            self._next_ping = now + interval / 2
        if now >= self._next_status:
            self._next_status = now + self.config.daemon.status_interval_s
            line = self.status_line()
            self.notifier.status(line if ok else f"{line}; {why}")
        if (
            self._max_runtime_s is not None
            and self._ready
            and now - self._t_ready >= self._max_runtime_s
        ):
            self.should_exit = True
        if self._stop_after is not None and self._results >= self._stop_after:
            self.should_exit = True
        if self.config.daemon.exit_when_sources_end and self._sources_ended():
            log.info("sources_ended", results=self._results)
            self.should_exit = True
        if self._on_tick is not None:
            self._on_tick(self)

    def status_line(self) -> str:
        """A short human line for STATUS= and the logs: rate, verdicts, outbox depth."""
        gen = self._gen
        fps = gen.pipeline.stats().fps if gen is not None else 0.0
        v = self._verdicts
        text = f"{fps:.1f} fps, {self._results} verdicts ({v['fail']} fail, {v['error']} error)"
        if self._publisher is not None:
            stats = self._publisher.stats()
            text += f", outbox {stats.outbox_depth}"
            if not stats.connected:
                text += ", broker disconnected"
        return text

    # ------------------------------------------------------------------ health and metrics

    def _sources_ended(self) -> bool:
        health = self._source_health()
        return bool(health) and all(h.state is SourceState.STOPPED for h in health)

    def _source_health(self) -> list[SourceHealth]:
        return [s.health() for s in self._sources]

    def engine_info(self) -> EngineInfo | None:
        gen = self._gen
        if gen is None:
            return None
        m = gen.model
        return EngineInfo(
            model=m.card.name,
            sha256=m.card.sha256 or m.file_sha256,
            engine=m.engine.name,
            version=m.engine.version,
            precision=m.engine.precision,
        )

    def health_report(self) -> HealthReport:
        """``/healthz``: live = making progress; ready = live, frames flow, cameras streaming,
        broker connected and outbox clear of its bound. ``reasons`` says what is missing."""
        now = time.monotonic()
        live, why = self.progress(now)
        reasons: list[str] = []
        if not self._ready:
            reasons.append("starting: no frame inspected yet")
        if self.should_exit:
            reasons.append("shutting down")
        if not live:
            reasons.append(why)
        cameras: dict[str, Any] = {}
        for h in self._source_health():
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
        if self._publisher is not None:
            p = self._publisher.stats()
            broker = {"connected": p.connected, "last_error": p.last_error}
            outbox = {"depth": p.outbox_depth, "oldest_age_s": p.oldest_age_s}
            outbox["near_bound"] = p.near_bound
            if not p.connected:
                reasons.append("broker not connected (results wait in the outbox)")
            if p.near_bound:
                reasons.append("outbox near its bound")
        with self._count_lock:
            last = self._last_inspected
            in_flight = self._submitted - self._results
        engine = self.engine_info()
        checks = {
            "cameras": cameras,
            "engine": None if engine is None else asdict(engine),
            "broker": broker,
            "outbox": outbox,
            "progress": {
                "last_inspected_age_s": round(now - last, 3) if last else None,
                "in_flight": in_flight,
                "results": self._results,
            },
            "reloads": self._reloads,
        }
        return HealthReport(live=live, ready=not reasons, reasons=tuple(reasons), checks=checks)

    def scrape(self) -> str:
        return self.metrics.registry.render()

    def _collect(self) -> None:
        gen = self._gen
        with self._count_lock:
            last = self._last_inspected
        self.metrics.collect(
            pipeline=gen.pipeline.stats() if gen is not None else None,
            publisher=self._publisher.stats() if self._publisher is not None else None,
            sources=self._source_health(),
            archive=self._archive.stats() if self._archive is not None else None,
            engine=self.engine_info(),
            ready=self._ready,
            progress_age_s=time.monotonic() - last if last else None,
            log_suppressed=self._rate_limit.suppressed_total,
        )

    def _status_info(self) -> StatusInfo:
        gen = self._gen
        cfg = gen.config if gen is not None else self.config
        card = gen.model.card if gen is not None else None
        return StatusInfo(
            version=__version__,
            model_name=card.name if card is not None else "",
            model_sha256=(card.sha256 if card is not None else ""),
            config_hash=gen.pipeline.config_hash if gen is not None else cfg.hash(),
            cameras=tuple(c.camera for c in cfg.cameras),
        )

    # ------------------------------------------------------------------ reload

    def request_reload(self) -> None:
        """What SIGHUP does (also callable from tests and the demo)."""
        self.reload_requested = True

    def _start_reload(self) -> None:
        self.notifier.reloading()
        self._reload_thread = threading.Thread(
            target=self._reload, name="defectd-reload", daemon=True
        )
        self._reload_thread.start()

    def _reload(self) -> None:
        t0 = time.monotonic()
        old = self._gen
        assert old is not None
        log.info("reload_started", config=str(self.config_path or "(in memory)"))
        try:
            new_cfg = (
                load_station_config(self.config_path)
                if self.config_path is not None
                else self.config
            )
            cfg, ignored = merge_reload(old.config, new_cfg)
            if ignored:
                log.warning("reload_needs_restart", keys=ignored)
            model = load_model(cfg, hang_file=self._hang_file)
            try:
                pipeline = self._make_pipeline(cfg, model, camera_setups(cfg))
                pipeline.start()
            except BaseException:
                model.engine.close()
                raise
        except DefectdError as exc:
            self.metrics.reloads.inc(result="failed")
            log.error("reload_failed", error=str(exc))
            self._publish_event("reload_failed", severity="error", error=str(exc))
            self.notifier.ready(self.status_line())
            return
        with self._gen_lock:
            if self.should_exit:  # shutting down meanwhile: keep the old generation
                discard = True
            else:
                discard = False
                self._gen = Generation(cfg, model, pipeline)
                self.config = cfg
        if discard:
            pipeline.stop(timeout=1.0)
            model.engine.close()
            return
        self._progress_epoch = time.monotonic()
        drained = old.pipeline.drain(cfg.daemon.drain_timeout_s)
        old.pipeline.stop(timeout=1.0)
        old.model.engine.close()
        self._reloads += 1
        model_changed = model.file_sha256 != old.model.file_sha256 or model.path != old.model.path
        self.metrics.reloads.inc(result="ok")
        if self._publisher is not None:
            self._publisher.set_status(self._status_info())
        self._publish_event(
            "model_reloaded" if model_changed else "config_reloaded",
            model=model.card.name,
            sha256=model.card.sha256 or model.file_sha256,
            previous_model=old.model.card.name,
            previous_sha256=old.model.card.sha256 or old.model.file_sha256,
            config_hash=pipeline.config_hash,
        )
        log.info(
            "reloaded",
            model=model.card.name,
            sha256=model.card.sha256 or model.file_sha256,
            model_changed=model_changed,
            old_drained=drained,
            reload_s=round(time.monotonic() - t0, 3),
        )
        self.notifier.ready(self.status_line())

    def _publish_event(self, kind: str, *, severity: str | None = None, **fields: Any) -> None:
        if self._publisher is None:
            return
        try:
            self._publisher.publish_event(kind, severity=severity, **fields)
        except DefectdError as exc:
            log.error("event_not_published", kind=kind, error=str(exc))
