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

The pieces it runs live beside it: ``station`` builds a generation (engine + pipeline),
``routing`` fans each result out to outbox, ledger, metrics, logs, archive and observers,
``reload`` builds and switches a new generation on SIGHUP, and ``health_report`` turns a
snapshot of the parts into the watchdog condition and the ``/healthz`` answer.

This module is over 600 lines because the life cycle wires every part of the station (line
contract, OPC UA, operator view, durability alarms) in one visible order; the parts themselves
live beside it (``station``, ``routing``, ``reload``, ``health_report``, ``line``, ``live``).
"""

from __future__ import annotations

import os
import signal
import threading
import time  # wall time for the operator view's events
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from defectd import __version__
from defectd.clock import SYSTEM_CLOCK, Clock, Deadline
from defectd.daemon.archive import Archive
from defectd.daemon.audit import AuditLog, ModelState
from defectd.daemon.config import SHUTDOWN_GRACE_S, StationConfig
from defectd.daemon.drift import CameraDrift, DriftMonitor, check_reference
from defectd.daemon.health import HealthReport, HealthServer
from defectd.daemon.health_report import HealthInputs, check_progress, health_report
from defectd.daemon.line import LineIntake
from defectd.daemon.logs import RateLimit, install_rate_limit
from defectd.daemon.opcua_link import OpcUaLink, station_state
from defectd.daemon.promote import PID_FILE
from defectd.daemon.reload import Intake, Reloader
from defectd.daemon.routing import Ledger, Progress, ResultObserver, ResultRouter
from defectd.daemon.sdnotify import SdNotifier
from defectd.daemon.sequence import SequenceStore
from defectd.daemon.shadow.runner import ShadowRunner
from defectd.daemon.shadow.store import ModelRef
from defectd.daemon.station import EngineOpener, Generation, LoadedModel, build_generation
from defectd.daemon.telemetry import EngineInfo, StationMetrics
from defectd.daemon.view import OperatorView, station_panel
from defectd.engines import open_engine
from defectd.engines.remote import RemoteEngine
from defectd.errors import ConfigError, DefectdError
from defectd.log import get_logger
from defectd.opcua.records import StationState
from defectd.pipeline.cameras import DEFAULT_SETUP
from defectd.pipeline.frame import Frame
from defectd.pipeline.inspection import Inspection
from defectd.pipeline.runner import PipelineResult
from defectd.pipeline.sources import (
    EventKind,
    Source,
    SourceEvent,
    SourceHealth,
    SourceState,
    make_sources,
)
from defectd.pipeline.stats import PipelineStats
from defectd.publish.messages import StatusInfo
from defectd.publish.mqtt import Publisher
from defectd.publish.outbox import check_outbox_file
from defectd.publish.triggers import TriggerListener

log = get_logger(__name__)

EXIT_OK = 0
EXIT_FORCED = 1
TICK_S = 0.1
RECENT_EVENTS = 50  # kept for the operator view
DISK_CHECK_S = 5.0


def _model_state(gen: Generation) -> ModelState:
    return ModelState(gen.model.card.name, gen.model.executed_sha256, gen.pipeline.config_hash)


class Service:
    """The daemon. ``serve()`` runs it to the end and returns the exit code.

    ``engine_opener`` opens the model's engine (``open_engine``; tests wrap it). ``model``:
    the model already opened for ``config`` (``defectd run``'s pre-flight check, which opened it
    with ``engine_opener``), used by the first generation instead of opening it again; the
    service owns it from construction on and closes its engine in ``shutdown``, also when the
    start fails before the model is used. Tests and
    ``defectd demo`` pass ``observers`` (called with every result, from pipeline threads),
    ``on_tick`` (called from the main loop), ``max_runtime_s`` (counted from ready) or
    ``stop_after_results`` to end it without a signal.
    """

    def __init__(
        self,
        config: StationConfig,
        *,
        config_path: Path | None = None,
        notifier: SdNotifier | None = None,
        engine_opener: EngineOpener = open_engine,
        model: LoadedModel | None = None,
        observers: Sequence[ResultObserver] = (),
        on_tick: Callable[[Service], None] | None = None,
        max_runtime_s: float | None = None,
        stop_after_results: int | None = None,
        install_signals: bool = True,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._config = config
        self._clock = clock
        self.config_path = config_path
        self.notifier = notifier if notifier is not None else SdNotifier()
        self.metrics = StationMetrics(config.station)
        self.metrics.registry.add_collector(self._collect)
        self.should_exit = False
        self.reload_requested = False
        self._engine_opener = engine_opener
        self._handed = model  # until the first generation takes it (or shutdown closes it)
        self._on_tick = on_tick
        self._max_runtime_s = max_runtime_s
        self._stop_after = stop_after_results
        self._install_signals = install_signals
        self._rate_limit = RateLimit(config.daemon.log_rate_limit_s, config.daemon.log_burst)

        self._progress = Progress(clock.monotonic)
        self._view: OperatorView | None = None
        if config.health.enabled and config.health.view:
            archive_dir = config.archive.dir if config.archive.enabled else None
            self._view = OperatorView(config.health, archive_dir)
            observers = (*observers, self._view.feed)
        self._events: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self._drift: DriftMonitor | None = None
        if config.drift.enabled:
            self._drift = DriftMonitor(
                config.drift,
                on_alarm=self._drift_alarm,
                on_clear=self._drift_cleared,
                registry=self.metrics.registry,
            )
            observers = (*observers, self._drift.observe)
        self._opcua = OpcUaLink()
        self._shadow: ShadowRunner | None = None
        self._router = ResultRouter(
            self.metrics, self._progress, (*observers, self._opcua.observe, self._observe_shadow)
        )
        self._intake = Intake()
        self._reloader = Reloader(
            self._intake,
            self._build,
            config_path=config_path,
            metrics=self.metrics,
            progress=self._progress,
            stopping=lambda: self.should_exit,
            on_switched=self._reloaded,
            on_failed=self._reload_failed,
        )
        self._publisher: Publisher | None = None
        self._archive: Archive | None = None
        self._audit = AuditLog(config.audit.path)
        self._pid_file: Path | None = None
        self._health: HealthServer | None = None
        self._sources: list[Source] = []
        self._sequence: SequenceStore | None = None
        self._line: LineIntake | None = None
        self._triggers: TriggerListener | None = None

        self._t_start = self._clock.monotonic()
        self._ready = False
        self._t_ready = 0.0
        self.outbox_left: int | None = None
        self.final_stats: PipelineStats | None = None
        self._stalled = False
        self._server_down = False  # the triton engine's server, as last seen by the main loop
        self._next_ping = 0.0
        self._next_status = 0.0
        self._next_disk_check = 0.0
        self._disks: dict[str, int] = {}
        self._disks_low: set[str] = set()

    @property
    def config(self) -> StationConfig:
        """The config in force: the current generation's (a reload may have changed it)."""
        gen = self._intake.current
        return gen.config if gen is not None else self._config

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
        cfg = self._config
        self._t_start = self._clock.monotonic()
        self._progress.restart_epoch()
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
        # A damaged outbox stops the start before the model loads (the publisher checks again).
        check_outbox_file(cfg.outbox.path)
        self._sequence = SequenceStore(cfg.state_dir)
        self.notifier.status("loading the model")
        handed, self._handed = self._handed, None
        gen = self._build(cfg, model=handed)
        self._intake.set_first(gen)
        if self._drift is not None:
            try:
                check_reference(cfg.drift, gen.model.card)
            except ConfigError as exc:
                raise ConfigError(f"drift.reference: {exc}") from None
            self._drift.set_model(gen.model.card)
        self._audit_start(gen)
        if self.should_exit:
            return

        if cfg.daemon.result_ledger is not None:
            self._router.ledger = Ledger(cfg.daemon.result_ledger)
        self._publisher = Publisher(cfg.mqtt, cfg.outbox, cfg.station, status=self._status_info())
        self._publisher.start()
        self._router.publisher = self._publisher
        if cfg.archive.enabled:
            self._archive = Archive(cfg.archive)
            self._archive.start()
            self._router.archive = self._archive
        if cfg.shadow is not None and cfg.shadow.enabled:
            self.notifier.status("loading the shadow candidate")
            shadow = ShadowRunner(
                cfg,
                registry=self.metrics.registry,
                publish=self._publisher.publish_shadow,
                opener=self._engine_opener,
                clock=self._clock,
                live_busy=self._progress.busy,
            )
            self._shadow = shadow
            shadow.start(ModelRef(gen.model.card.name, gen.model.executed_sha256))
        gen.pipeline.start()
        self._opcua.start(
            cfg.opcua, cfg.station, [c.camera for c in cfg.cameras], self._opcua_state
        )
        if cfg.health.enabled:
            routes, middleware = self._view.mount(self.view_state) if self._view else ([], [])
            self._health = HealthServer(
                cfg.health.address,
                self.health_report,
                self.scrape,
                routes=routes,
                middleware=middleware,
            )
            self._health.start()
        if self.should_exit:
            return

        self.notifier.status("opening cameras")
        # Part identity from the line (docs/plc.md): pairing, no_frame verdicts, gate deadlines.
        line = self._line = LineIntake(
            cfg.station,
            cfg.cameras,
            submit=self._on_frame,
            on_no_frame=self._no_frame,
            publish_event=lambda kind, fields: self._publish_event(kind, **fields),
        )
        self._router.stamp = line.stamp
        # GenICam cameras of one station share one producer hub.
        for source in make_sources([c.source for c in cfg.cameras], cfg.station):
            source.number_from(self._sequence.start(source.camera))  # seq goes on after a restart
            source.start(line.on_frame, self._on_event)
            self._sources.append(source)
        line.attach(self._sources)
        line.start()
        if line.cameras_with_triggers:
            self._triggers = TriggerListener(
                cfg.mqtt, cfg.station, line.cameras_with_triggers, line.on_trigger
            )
            self._triggers.start()
        self._opcua.set_trigger(
            [c.camera for c in cfg.cameras if c.line.mode == "plc-trigger"], line.on_trigger
        )
        self._progress.restart_epoch()
        self._write_pid_file(cfg)
        self.notifier.status("waiting for the first frame")
        log.info("started", model=gen.model.card.name, engine=gen.model.engine.name)

    def main_loop(self) -> None:
        while not self.should_exit:
            self._clock.sleep(TICK_S)
            if self.reload_requested and not self._reloader.busy:
                self.reload_requested = False
                self.notifier.reloading()
                self._reloader.start()
            self._reloader.poll()
            self._tick(self._clock.monotonic())

    def shutdown(self, *, startup_failed: bool = False) -> None:
        """Stop intake, drain, flush, publish ``offline``; every step bounded in time.

        One deadline, ``daemon.drain_timeout_s`` from now, is shared by every step in turn;
        the steps that must run even when the drain used it all (stopping threads, flushing
        the outbox and publishing ``offline``) get a floor out of ``SHUTDOWN_GRACE_S`` more,
        so the whole shutdown ends within ``drain_timeout_s + SHUTDOWN_GRACE_S`` (what the
        config check holds against the service manager's stop timeout).
        """
        cfg = self.config
        deadline = Deadline(self._clock, cfg.daemon.drain_timeout_s, SHUTDOWN_GRACE_S)
        self.notifier.stopping("draining" if not startup_failed else "start failed")
        if not startup_failed:
            log.info(
                "stopping", in_flight=self.in_flight, drain_timeout_s=cfg.daemon.drain_timeout_s
            )
        if self._triggers is not None:
            self._triggers.stop(timeout=deadline.step(0.5, cap_s=2.0))
        for source in self._sources:
            source.stop(timeout=deadline.step(0.5, cap_s=5.0))
        if self._sequence is not None:
            self._sequence.close()
        self._reloader.join(deadline.left())
        drained = True
        gen = self._intake.current
        if gen is not None:
            if gen.pipeline.stats().running:
                drained = gen.pipeline.drain(deadline.left())
                self.final_stats = gen.pipeline.stats()
                gen.pipeline.stop(timeout=deadline.step(0.5))
            gen.model.engine.close()
        if self._handed is not None:  # the start failed before the first generation took it
            self._handed.engine.close()
            self._handed = None
        if self._line is not None:
            self._line.stop()  # parts still waiting for a frame get error:no_frame
        if self._shadow is not None:
            # After the live drain (its last verdicts reach the candidate's queue), before the
            # publisher stops (the last shadow summary goes through the outbox).
            self._shadow.stop(timeout=deadline.step(0.5, cap_s=5.0))
        if self._archive is not None:
            self._archive.stop(timeout=deadline.step(0.5, cap_s=5.0))
        depth: int | None = None
        not_durable = 0
        if self._publisher is not None:
            self._publisher.stop(drain_timeout_s=deadline.step(1.0))
            final = self._publisher.stats()
            depth = self.outbox_left = final.outbox_depth
            not_durable = final.not_durable
        self._opcua.stop("offline", timeout=deadline.step(0.5, cap_s=5.0))
        if self._router.ledger is not None:
            self._router.ledger.close()
        if self._view is not None:
            self._view.stop()
        if self._health is not None:
            self._health.stop()
        if self._pid_file is not None:
            self._pid_file.unlink(missing_ok=True)
        if not startup_failed:
            snap = self._progress.snapshot()
            log.info(
                "stopped",
                drained=drained,
                results=snap.results,
                outbox_left=depth,
                not_durable=not_durable,  # verdicts sent only directly: not in the outbox
                verdicts=snap.verdicts,
            )
        self.notifier.close()

    def _build(self, cfg: StationConfig, model: LoadedModel | None = None) -> Generation:
        """A generation for ``cfg`` (start and reload); ``model``: one already open for it."""
        return build_generation(
            cfg, self._router, opener=self._engine_opener, clock=self._clock, model=model
        )

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

    # ------------------------------------------------------------------ intake

    def _on_frame(self, frame: Frame) -> None:
        if self._sequence is not None:
            self._sequence.used(frame.camera, frame.seq)
        self.metrics.frames.inc(camera=frame.camera)
        self._progress.frame_submitted()
        self._intake.submit(frame)

    def _on_event(self, event: SourceEvent) -> None:
        self.metrics.camera_events.inc(camera=event.camera, kind=event.kind)
        # A finite source (replay, counted line) ending is the normal end, not a fault.
        emit = log.info if event.kind == EventKind.END_OF_STREAM else log.warning
        emit("camera_event", camera=event.camera, kind=event.kind, detail=event.detail)
        self._publish_event(event.kind, camera=event.camera, detail=event.detail)

    # ------------------------------------------------------------------ progress and systemd

    def pipeline_stats(self) -> PipelineStats | None:
        """The current pipeline's counters, queue depths, fps and latency percentiles."""
        gen = self._intake.current
        return gen.pipeline.stats() if gen is not None else None

    @property
    def line(self) -> LineIntake | None:
        """Part pairing per camera (``stats()``), once the cameras are open."""
        return self._line

    @property
    def trigger_listener(self) -> TriggerListener | None:
        """The subscriber of the PLC's triggers, when a camera has a line mode."""
        return self._triggers

    @property
    def in_flight(self) -> int:
        return self._progress.snapshot().in_flight

    @property
    def ready(self) -> bool:
        return self._ready

    def progress(self, now: float | None = None) -> tuple[bool, str]:
        """Whether the pipeline makes progress (the watchdog condition), and if not, why;
        see ``health_report.check_progress``."""
        return check_progress(self._health_inputs(now))

    def _tick(self, now: float) -> None:
        results = self._progress.snapshot()
        if not self._ready and results.inspected > 0:
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
            self._next_status = now  # say why in STATUS= at once
        interval = self.notifier.watchdog_interval_s
        if interval is not None and self._ready and ok and now >= self._next_ping:
            self.notifier.watchdog()
            self._next_ping = now + interval / 2
        if now >= self._next_disk_check:
            self._next_disk_check = now + DISK_CHECK_S
            self._check_disks()
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
        if self._stop_after is not None and results.results >= self._stop_after:
            self.should_exit = True
        if self.config.daemon.exit_when_sources_end and self._sources_ended():
            log.info("sources_ended", results=results.results)
            self.should_exit = True
        self._watch_server()
        self._opcua.tick(now)
        if self._on_tick is not None:
            self._on_tick(self)

    def _watch_server(self) -> None:
        """An event when the inference server of a ``triton`` engine stops or starts answering
        (the engine itself fails its batches fast and reconnects; see ``triton_backend``)."""
        info = self.engine_info()
        server = info.server if info is not None else None
        down = server is not None and not server.reachable
        if server is None or down == self._server_down:
            return
        self._server_down = down
        if down:
            log.error("inference_server_unreachable", url=server.url, detail=server.detail)
            self._publish_event(
                "inference_server_down",
                severity="error",
                url=server.url,
                model=server.model,
                detail=server.detail,
            )
        else:
            log.info("inference_server_answering", url=server.url)
            self._publish_event(
                "inference_server_back",
                url=server.url,
                model=server.model,
                detail=f"back after {server.recoveries} outage(s)",
            )

    def status_line(self) -> str:
        """A short human line for STATUS= and the logs: rate, verdicts, outbox depth."""
        stats = self.pipeline_stats()
        fps = stats.fps if stats is not None else 0.0
        snap = self._progress.snapshot()
        v = snap.verdicts
        text = f"{fps:.1f} fps, {snap.results} verdicts ({v['fail']} fail, {v['error']} error)"
        if self._publisher is not None:
            p = self._publisher.stats()
            text += f", outbox {p.outbox_depth}"
            if not p.connected:
                text += ", broker disconnected"
        return text

    # ------------------------------------------------------------------ health and metrics

    def _check_disks(self) -> None:
        """Free space of each directory the daemon writes (the disk gauge), and a
        ``disk_space_low`` warning event when one falls below ``daemon.disk_warn_free_bytes``
        (again only after it recovered to 1.2 times that)."""
        cfg = self.config
        dirs = {"state": cfg.state_dir, "outbox": cfg.outbox.path.parent}
        if cfg.archive.enabled:
            dirs["archive"] = cfg.archive.dir
        if cfg.model.cache_dir is not None:
            dirs["cache"] = cfg.model.cache_dir
        limit = cfg.daemon.disk_warn_free_bytes
        for name, path in dirs.items():
            try:
                st = os.statvfs(path)
            except OSError:
                continue
            free = self._disks[name] = st.f_bavail * st.f_frsize
            if limit and free < limit and name not in self._disks_low:
                self._disks_low.add(name)
                log.warning("disk_space_low", dir=name, path=str(path), free_bytes=free)
                self._publish_event(
                    "disk_space_low", dir=name, path=str(path), free_bytes=free, limit=limit
                )
            elif name in self._disks_low and free >= limit * 1.2:
                self._disks_low.discard(name)
                log.info("disk_space_ok", dir=name, path=str(path), free_bytes=free)

    def _sources_ended(self) -> bool:
        health = self._source_health()
        return bool(health) and all(h.state is SourceState.STOPPED for h in health)

    def _source_health(self) -> list[SourceHealth]:
        return [s.health() for s in self._sources]

    def engine_info(self) -> EngineInfo | None:
        gen = self._intake.current
        if gen is None:
            return None
        m = gen.model
        return EngineInfo(
            model=m.card.name,
            sha256=m.executed_sha256,
            engine=m.engine.name,
            version=m.engine.version,
            precision=m.engine.precision,
            server=m.engine.server_status() if isinstance(m.engine, RemoteEngine) else None,
        )

    def _health_inputs(self, now: float | None = None) -> HealthInputs:
        return HealthInputs(
            now=self._clock.monotonic() if now is None else now,
            started=self._t_start,
            ready=self._ready,
            shutting_down=self.should_exit,
            progress=self._progress.snapshot(),
            sources=self._source_health(),
            publisher=self._publisher.stats() if self._publisher is not None else None,
            engine=self.engine_info(),
            reloads=self._reloader.reloads,
            disks=dict(self._disks),
            daemon=self.config.daemon,
            line=self._line.stats() if self._line is not None else {},
            triggers_connected=(
                None if self._triggers is None else self._triggers.connected.is_set()
            ),
        )

    @property
    def http_url(self) -> str | None:
        """``http://host:port`` of the health/metrics endpoint while it serves, else None."""
        return self._health.url if self._health is not None else None

    def view_state(self) -> dict[str, Any]:
        """The operator view's station panel; see ``view.station_panel``."""
        cfg = self.config
        gen = self._intake.current
        setups = gen.pipeline.cameras if gen is not None else {}
        engine = self.engine_info()
        stats = self.pipeline_stats()
        return station_panel(
            station=cfg.station,
            version=__version__,
            now_wall=time.time(),
            report=self.health_report(),
            progress=self._progress.snapshot(),
            fps=stats.fps if stats is not None else 0.0,
            broker_address=f"{cfg.mqtt.host}:{cfg.mqtt.port}",
            calibration={
                c.camera: (c.calibration, setups.get(c.camera, DEFAULT_SETUP)) for c in cfg.cameras
            },
            model_sha256=engine.sha256 if engine is not None else "",
            events=list(self._events),
        )

    def health_report(self) -> HealthReport:
        """``/healthz``; see ``health_report.health_report``."""
        return health_report(self._health_inputs())

    def scrape(self) -> str:
        return self.metrics.registry.render()

    def _collect(self) -> None:
        last = self._progress.snapshot().last_inspected
        self.metrics.collect(
            pipeline=self.pipeline_stats(),
            publisher=self._publisher.stats() if self._publisher is not None else None,
            sources=self._source_health(),
            archive=self._archive.stats() if self._archive is not None else None,
            engine=self.engine_info(),
            ready=self._ready,
            progress_age_s=self._clock.monotonic() - last if last else None,
            log_suppressed=self._rate_limit.suppressed_total,
            disks=dict(self._disks),
            opcua=self._opcua.stats(),
        )

    @property
    def shadow(self) -> ShadowRunner | None:
        """Shadow mode's runner while ``[shadow]`` is on."""
        return self._shadow

    def _observe_shadow(self, result: PipelineResult) -> None:
        if self._shadow is not None:
            self._shadow.observe(result)

    def _no_frame(self, ins: Inspection) -> None:
        self._router.no_frame(ins)
        self._opcua.submit(ins)

    def _opcua_state(self) -> StationState:
        gen = self._intake.current
        return station_state(
            started=self._ready,
            stopping=self.should_exit,
            report=self.health_report(),
            engine=self.engine_info(),
            publisher=self._publisher.stats() if self._publisher is not None else None,
            config_hash=gen.pipeline.config_hash if gen is not None else "",
        )

    def _status_info(self) -> StatusInfo:
        gen = self._intake.current
        cfg = self.config
        card = gen.model.card if gen is not None else None
        return StatusInfo(
            version=__version__,
            model_name=card.name if card is not None else "",
            model_sha256=gen.model.executed_sha256 if gen is not None else "",
            config_hash=gen.pipeline.config_hash if gen is not None else cfg.hash(),
            cameras=tuple(c.camera for c in cfg.cameras),
        )

    # ------------------------------------------------------------------ reload

    def request_reload(self) -> None:
        """What SIGHUP does (also callable from tests and the demo)."""
        self.reload_requested = True

    def _reloaded(self, old: Generation, new: Generation, drained: bool, reload_s: float) -> None:
        model, previous = new.model, old.model
        model_changed = model.executed_sha256 != previous.executed_sha256 or (
            model.path != previous.path
        )
        self._audit_reload(old, new)
        if self._publisher is not None:
            self._publisher.set_status(self._status_info())
        if self._shadow is not None:
            self._shadow.set_live(ModelRef(model.card.name, model.executed_sha256))
        if model_changed and self._drift is not None:
            # The new model says other things: its reference starts over, the boost ends.
            self._drift.set_model(model.card)
            if self._archive is not None:
                self._archive.reset_pass_sample()
        self._publish_event(
            "model_reloaded" if model_changed else "config_reloaded",
            model=model.card.name,
            sha256=model.executed_sha256,
            previous_model=previous.card.name,
            previous_sha256=previous.executed_sha256,
            config_hash=new.pipeline.config_hash,
        )
        log.info(
            "reloaded",
            model=model.card.name,
            sha256=model.executed_sha256,
            model_changed=model_changed,
            old_drained=drained,
            reload_s=round(reload_s, 3),
        )
        self.notifier.ready(self.status_line())

    # ------------------------------------------------------------------ audit

    def _write_pid_file(self, cfg: StationConfig) -> None:
        """``<state_dir>/defectd.pid``: where ``defectd promote`` finds the daemon to reload.
        Only written when this process handles SIGHUP (a service on a test thread does not)."""
        if not self._install_signals or threading.current_thread() is not threading.main_thread():
            return
        path = cfg.state_dir / PID_FILE
        try:
            path.write_text(f"{os.getpid()}\n")
        except OSError as exc:
            log.warning("pid_file_not_written", path=str(path), error=str(exc))
            return
        self._pid_file = path

    def _audit_start(self, gen: Generation) -> None:
        """Record the state at start when it differs from the last audited one (a model or
        setting changed while the daemon was stopped). A log that cannot be written stops the
        start: a station must not change models without its audit trail."""
        cfg = gen.config
        now = _model_state(gen)
        last = self._audit.last_state(cfg.station)
        if last == now:
            return
        reason = (
            "first start with this audit log"
            if last is None
            else "model or decision settings differ from the last audited state"
        )
        self._audit.append("start", station=cfg.station, reason=reason, old=last, new=now)
        log.info("audit_appended", action="start", sha256=now.sha256, config_hash=now.config_hash)

    def _audit_reload(self, old: Generation, new: Generation) -> None:
        before, after = _model_state(old), _model_state(new)
        if before == after:
            return
        changed = [
            key
            for key in ("model", "pipeline", "postprocess", "rules")
            if getattr(old.config, key) != getattr(new.config, key)
        ]
        if before.sha256 != after.sha256 and "model" not in changed:
            changed.append("model file")
        if [(c.calibration, c.roi, c.ignore_zones) for c in old.config.cameras] != [
            (c.calibration, c.roi, c.ignore_zones) for c in new.config.cameras
        ]:
            changed.append("cameras")
        if before.config_hash != after.config_hash and not changed:
            changed.append("files named by the config (calibration, zones)")
        try:
            self._audit.append(
                "reload",
                station=new.config.station,
                reason="reload (SIGHUP)",
                old=before,
                new=after,
                details={"changed": changed, "model_path": str(new.model.path)},
            )
        except DefectdError as exc:
            log.error("audit_failed", error=str(exc))
            self._publish_event("audit_failed", severity="error", error=str(exc))
            return
        log.info("audit_appended", action="reload", sha256=after.sha256, changed=changed)

    # ------------------------------------------------------------------ drift

    @property
    def drift(self) -> DriftMonitor | None:
        """Drift monitoring (``[drift]``), None when it is switched off."""
        return self._drift

    def _drift_alarm(self, drift: CameraDrift) -> None:
        """A camera drifted: the event with the evidence, and more of its passes archived."""
        if self._archive is not None:
            self._archive.set_pass_sample(drift.camera, self.config.drift.archive_pass_sample)
        fields = drift.evidence()
        fields["detail"] = f"{drift.worst} moved (score {drift.score:.2f})"
        self._publish_event("drift_alarm", severity="warning", **fields)

    def _drift_cleared(self, drift: CameraDrift) -> None:
        if self._archive is not None:
            self._archive.set_pass_sample(drift.camera, None)
        self._publish_event(
            "drift_cleared", camera=drift.camera, score=round(drift.score, 3), parts=drift.parts
        )

    def _reload_failed(self, error: str) -> None:
        self._publish_event("reload_failed", severity="error", error=error)
        self.notifier.ready(self.status_line())

    def _publish_event(self, kind: str, *, severity: str | None = None, **fields: Any) -> None:
        self._events.append(
            {
                "time": time.time(),
                "kind": kind,
                "severity": severity,
                "camera": fields.get("camera"),
                "detail": fields.get("detail") or fields.get("error") or fields.get("model"),
            }
        )
        if self._publisher is None:
            return
        try:
            self._publisher.publish_event(kind, severity=severity, **fields)
        except DefectdError as exc:
            log.error("event_not_published", kind=kind, error=str(exc))
