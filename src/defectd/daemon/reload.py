"""SIGHUP reload: a new generation (engine + pipeline) built beside the running one.

``Reloader.start()`` runs one reload on the thread ``defectd-reload``: read the config file
again, keep what needs a restart (``merge_reload``), open and warm up the model, start the new
pipeline, switch the cameras' intake to it under the intake lock, then drain and close the old
one. A config or model that fails leaves the running generation in place and says why (log,
``reload_failed`` event, ``defectd_reloads_total{result="failed"}``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from defectd.daemon.config import StationConfig, load_station_config
from defectd.daemon.routing import Progress
from defectd.daemon.station import Generation
from defectd.daemon.telemetry import StationMetrics
from defectd.errors import DefectdError
from defectd.log import get_logger
from defectd.pipeline.frame import Frame

log = get_logger(__name__)


def merge_reload(old: StationConfig, new: StationConfig) -> tuple[StationConfig, list[str]]:
    """The config a reload applies, and the keys that changed but need a restart.

    A reload applies ``model``, ``pipeline``, ``postprocess``, ``rules`` and each camera's
    ``calibration``, ``roi`` and ``ignore_zones``. The station id, the camera sources, MQTT,
    outbox, archive, audit, health and daemon settings keep their running values.
    """
    ignored = [
        key
        for key in ("station", "mqtt", "outbox", "archive", "audit", "health", "daemon")
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


class Intake:
    """The generation that takes the cameras' frames, switched under one lock.

    ``submit`` (camera threads) and ``switch`` (the reload thread) take the lock, so a frame
    goes either to the old pipeline before the switch or to the new one after it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gen: Generation | None = None
        self._closed = False

    @property
    def current(self) -> Generation | None:
        return self._gen

    def submit(self, frame: Frame) -> None:
        with self._lock:
            gen = self._gen
            assert gen is not None
            gen.pipeline.submit(frame)

    def switch(self, new: Generation, *, unless: Callable[[], bool]) -> Generation | None:
        """Make ``new`` current and return the one it replaces; None (and no switch) when
        ``unless()`` is true under the lock or no generation is current yet."""
        with self._lock:
            if unless() or self._gen is None:
                return None
            old, self._gen = self._gen, new
            return old

    def set_first(self, gen: Generation) -> None:
        with self._lock:
            self._gen = gen


class Reloader:
    """Runs at most one reload at a time on its own thread.

    ``build`` opens a generation for a config (not started); ``stopping`` says the service is
    shutting down (a generation built meanwhile is discarded); ``on_switched(old, new,
    drained, reload_s)`` and ``on_failed(error)`` report the outcome (metrics, events, status).
    """

    def __init__(
        self,
        intake: Intake,
        build: Callable[[StationConfig], Generation],
        *,
        config_path: Path | None,
        metrics: StationMetrics,
        progress: Progress,
        stopping: Callable[[], bool],
        on_switched: Callable[[Generation, Generation, bool, float], None],
        on_failed: Callable[[str], None],
    ) -> None:
        self._intake = intake
        self._build = build
        self._config_path = config_path
        self._metrics = metrics
        self._progress = progress
        self._stopping = stopping
        self._on_switched = on_switched
        self._on_failed = on_failed
        self._thread: threading.Thread | None = None
        self.reloads = 0

    @property
    def busy(self) -> bool:
        """A reload thread runs (or has ended and not been reaped by ``poll``)."""
        return self._thread is not None

    def poll(self) -> None:
        """Forget a reload thread that has ended (called from the main loop)."""
        if self._thread is not None and not self._thread.is_alive():
            self._thread = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="defectd-reload", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        t0 = time.monotonic()
        old = self._intake.current
        assert old is not None
        log.info("reload_started", config=str(self._config_path or "(in memory)"))
        try:
            new_cfg = (
                load_station_config(self._config_path)
                if self._config_path is not None
                else old.config
            )
            cfg, ignored = merge_reload(old.config, new_cfg)
            if ignored:
                log.warning("reload_needs_restart", keys=ignored)
            new = self._build(cfg)
            try:
                new.pipeline.start()
            except BaseException:
                new.model.engine.close()
                raise
        except DefectdError as exc:
            self._metrics.reloads.inc(result="failed")
            log.error("reload_failed", error=str(exc))
            self._on_failed(str(exc))
            return
        replaced = self._intake.switch(new, unless=self._stopping)
        if replaced is None:  # shutting down meanwhile: keep the old generation
            new.pipeline.stop(timeout=1.0)
            new.model.engine.close()
            return
        self._progress.restart_epoch()
        drained = replaced.pipeline.drain(cfg.daemon.drain_timeout_s)
        replaced.pipeline.stop(timeout=1.0)
        replaced.model.engine.close()
        self.reloads += 1
        self._metrics.reloads.inc(result="ok")
        self._on_switched(replaced, new, drained, time.monotonic() - t0)
