"""Drift monitoring: does each camera still see (and the model still say) what it did?

A ``ResultRouter`` observer. Per part and camera it measures the statistics of
``defectd.data.drift`` (brightness, contrast, sharpness of the frame; the model's highest defect
probability; reject and error verdicts) and feeds each into an EWMA chart against a reference
profile: the model card's ``drift`` profile (image statistics of the training images) when the
card has one and ``[drift] reference`` allows it, else what the camera showed over its first
``learn_parts`` parts (model-output statistics are always learned on the line: a training set's
defect mix is not the line's). Each chart's limit is calibrated to the configured false-alarm
rate (``defectd.data.drift.ewma_limit``: per statistic ``false_alarm_rate / statistics``, so
the camera's rate stays below ``false_alarm_rate`` per part).

The camera's drift score is the largest chart level (1.0 = at its limit). At 1.0 the monitor
raises ``drift_alarm`` (event with the evidence: each statistic's reference and current
smoothed value and level) and the archive keeps ``archive_pass_sample`` of that camera's passes,
so that the parts of the new condition are collected for retraining; below ``clear_below`` the
alarm clears (``drift_cleared``) and the archive returns to its own rate.

Calibrating the limits takes tens of milliseconds per statistic, so it runs on a short-lived
thread (``drift-calibrate-<camera>``), never in the pipeline's result path; the per-part work
is a strided sample of the frame and six multiply-adds (microseconds, ``bench/drift.py``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from defectd.daemon.metrics import Registry
from defectd.data.drift import (
    IMAGE_STATISTICS,
    STATISTICS,
    Chart,
    StatReference,
    ewma_limit,
    image_statistics,
    null_distribution,
    stat_reference,
)
from defectd.errors import ConfigError
from defectd.log import get_logger
from defectd.model.card import ModelCard
from defectd.pipeline.inspection import Verdict
from defectd.pipeline.runner import PipelineResult

log = get_logger(__name__)

# Error verdicts that say nothing about the line: the station is stopping.
_NOT_LINE_ERRORS = frozenset({"error:stopped"})


class DriftConfig(BaseModel):
    """``[drift]``: per-camera drift monitoring and its alarm."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    reference: Literal["auto", "card", "learn"] = Field(
        default="auto",
        description="auto: the card's profile for image statistics when it has one, else "
        "learned; card: the card must have one; learn: always learn over the first parts",
    )
    learn_parts: Annotated[int, Field(ge=50, le=1_000_000)] = Field(
        default=500, description="parts per camera that make a learned reference"
    )
    smoothing: Annotated[float, Field(gt=0.0, le=0.5)] = Field(
        default=0.02,
        description="EWMA weight of each new part (about 2/smoothing parts remembered)",
    )
    false_alarm_rate: Annotated[float, Field(gt=0.0, le=0.01)] = Field(
        default=1e-5, description="false alarms per part and camera on a stable line"
    )
    clear_below: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        default=0.5, description="an alarm clears when the drift score falls below this"
    )
    statistics: tuple[str, ...] = Field(default=STATISTICS, min_length=1)
    archive_pass_sample: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        default=0.2, description="fraction of a drifting camera's passes the archive keeps"
    )

    @field_validator("statistics")
    @classmethod
    def _known(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [s for s in value if s not in STATISTICS]
        if unknown:
            raise ValueError(
                f"unknown statistic {', '.join(map(repr, unknown))}; choose from "
                f"{', '.join(STATISTICS)}"
            )
        if len(set(value)) != len(value):
            raise ValueError("a statistic is named twice")
        return value


def check_reference(config: DriftConfig, card: ModelCard) -> None:
    """``ConfigError`` when ``reference = "card"`` and the card has no drift profile (the
    message is prefixed with the key by the caller)."""
    if config.enabled and config.reference == "card" and card.drift is None:
        raise ConfigError(
            f"'card' but the card of model {card.name!r} has no drift profile (cards made "
            "before defectd train stored one, or for outside models): use 'auto' or 'learn'"
        )


class DriftState(Enum):
    LEARNING = "learning"  # some statistics have no reference yet
    WATCHING = "watching"
    ALARM = "alarm"


@dataclass(frozen=True, slots=True)
class StatisticView:
    """One statistic of a camera: its reference mean, current smoothed value, level (1.0 = at
    the limit) and limit in reference standard deviations of the smoothed value."""

    reference: float
    now: float
    level: float
    limit_sigma: float

    def as_dict(self) -> dict[str, float]:
        return {
            "reference": round(self.reference, 4),
            "now": round(self.now, 4),
            "level": round(self.level, 3),
            "limit_sigma": round(self.limit_sigma, 2),
        }


@dataclass(frozen=True, slots=True)
class CameraDrift:
    """A camera's drift at one instant: state, score, parts seen and alarms raised."""

    camera: str
    state: DriftState
    score: float
    parts: int
    alarms: int
    statistics: dict[str, StatisticView]
    learning_left: int
    seq: int = -1  # the camera's last part: the one that raised (or cleared) the alarm
    part_id: str | None = None

    @property
    def worst(self) -> str | None:
        """The statistic that moved most (highest level), None before any chart runs."""
        if not self.statistics:
            return None
        return max(self.statistics.items(), key=lambda kv: kv[1].level)[0]

    def evidence(self) -> dict[str, Any]:
        """The alarm event's fields: what moved, reference vs now, for every statistic."""
        return {
            "camera": self.camera,
            "score": round(self.score, 3),
            "statistic": self.worst,
            "parts": self.parts,
            "seq": self.seq,
            "part_id": self.part_id,
            "statistics": {
                k: v.as_dict()
                for k, v in sorted(self.statistics.items(), key=lambda kv: -kv[1].level)
            },
        }


@dataclass
class _Camera:
    charts: dict[str, Chart] = field(default_factory=dict)
    learning: dict[str, list[float]] = field(default_factory=dict)
    calibrating: bool = False
    parts: int = 0
    alarm: bool = False
    alarms: int = 0
    score: float = 0.0
    seq: int = -1
    part_id: str | None = None


DriftCallback = Callable[[CameraDrift], None]


class DriftMonitor:
    """Drift charts of every camera, fed by ``observe`` (a ``ResultRouter`` observer).

    ``on_alarm`` / ``on_clear`` are called with the camera's ``CameraDrift`` when its score
    crosses 1.0 / falls below ``clear_below`` (from the pipeline thread that gave the part;
    they must be quick). ``set_model(card)`` restarts every camera on a new model's reference
    (at start and after a reload that changed the model). ``background=False`` calibrates in
    the calling thread (tests).
    """

    def __init__(
        self,
        config: DriftConfig,
        *,
        on_alarm: DriftCallback | None = None,
        on_clear: DriftCallback | None = None,
        registry: Registry | None = None,
        background: bool = True,
    ) -> None:
        self.config = config
        self._listeners: list[tuple[DriftCallback | None, DriftCallback | None]] = [
            (on_alarm, on_clear)
        ]
        self._background = background
        self._lock = threading.Lock()
        self._cameras: dict[str, _Camera] = {}
        self._alarm_totals: dict[str, int] = {}  # survive set_model (a metric's total)
        self._card_refs: dict[str, StatReference] = {}
        self._epoch = 0  # bumped by set_model: calibrations of an older model are dropped
        self._threads: list[threading.Thread] = []
        self._stat_rate = config.false_alarm_rate / len(config.statistics)
        self._image_stats = [s for s in config.statistics if s in IMAGE_STATISTICS]
        if registry is not None:
            self._score = registry.gauge(
                "defectd_drift_score",
                "Drift score per camera: the highest chart level (alarm at 1, clears below "
                "drift.clear_below).",
                ["camera"],
            )
            self._level = registry.gauge(
                "defectd_drift_level",
                "Chart level of each drift statistic per camera (1 = at its limit).",
                ["camera", "statistic"],
            )
            self._alarm_gauge = registry.gauge(
                "defectd_drift_alarm", "1 while a camera's drift alarm is raised.", ["camera"]
            )
            self._learning = registry.gauge(
                "defectd_drift_learning",
                "Parts a camera still needs before its learned drift reference is complete.",
                ["camera"],
            )
            self._alarms = registry.counter(
                "defectd_drift_alarms_total", "Drift alarms raised per camera.", ["camera"]
            )
            registry.add_collector(self._collect)

    # -- model -------------------------------------------------------------------------------

    def set_model(self, card: ModelCard | None) -> None:
        """Start over on ``card``'s reference: every camera learns (or takes from the card)
        anew, alarms are cleared (``on_clear`` is not called: the model changed)."""
        refs: dict[str, StatReference] = {}
        if card is not None and card.drift is not None and self.config.reference != "learn":
            refs = {
                k: v for k, v in card.drift.statistics.items() if k in self._image_stats and v.n
            }
        with self._lock:
            self._epoch += 1
            self._card_refs = refs
            self._cameras.clear()

    def _new_camera(self, camera: str) -> _Camera:
        cam = _Camera()
        refs = dict(self._card_refs)
        cam.learning = {s: [] for s in self.config.statistics if s not in refs}
        self._cameras[camera] = cam
        if refs:
            self._start_calibration(camera, cam, refs)
        return cam

    # -- per part ----------------------------------------------------------------------------

    def observe(self, result: PipelineResult) -> None:
        """One part's statistics into its camera's charts (pipeline threads)."""
        ins = result.inspection
        values: dict[str, float] = {}
        image = result.frame.image
        if self._image_stats and image.size:
            b, c, s = image_statistics(image)
            values.update(brightness=b, contrast=c, sharpness=s)
        if ins.verdict is Verdict.ERROR:
            if ins.rule in _NOT_LINE_ERRORS:
                return
            values["error"] = 1.0
        else:
            values["error"] = 0.0
            values["reject"] = 1.0 if ins.verdict is Verdict.FAIL else 0.0
            if result.score is not None:
                values["score"] = result.score
        raised = cleared = None
        with self._lock:
            cam = self._cameras.get(ins.camera) or self._new_camera(ins.camera)
            cam.parts += 1
            cam.seq, cam.part_id = ins.seq, ins.part_id or result.frame.part_id
            for name, chart in cam.charts.items():
                x = values.get(name)
                if x is not None:
                    chart.update(x)
            if cam.learning and not cam.calibrating:
                self._learn(ins.camera, cam, values)
            if not cam.charts:
                return
            cam.score = score = max(ch.level for ch in cam.charts.values())
            if not cam.alarm and score >= 1.0:
                cam.alarm = True
                cam.alarms += 1
                self._alarm_totals[ins.camera] = self._alarm_totals.get(ins.camera, 0) + 1
                raised = self._view(ins.camera, cam)
            elif cam.alarm and score < self.config.clear_below:
                cam.alarm = False
                cleared = self._view(ins.camera, cam)
        if raised is not None:
            log.warning("drift_alarm", **raised.evidence())
            for on_alarm, _ in self._listeners:
                if on_alarm is not None:
                    on_alarm(raised)
        if cleared is not None:
            log.info("drift_cleared", camera=cleared.camera, score=round(cleared.score, 3))
            for _, on_clear in self._listeners:
                if on_clear is not None:
                    on_clear(cleared)

    def listen(
        self, on_alarm: DriftCallback | None = None, on_clear: DriftCallback | None = None
    ) -> None:
        """Call these too when an alarm is raised / cleared (after the ones given first);
        attach before the first part."""
        self._listeners.append((on_alarm, on_clear))

    def _learn(self, camera: str, cam: _Camera, values: Mapping[str, float]) -> None:
        for name, seen in cam.learning.items():
            x = values.get(name)
            if x is not None and len(seen) < self.config.learn_parts:
                seen.append(x)
        if all(len(v) >= self.config.learn_parts for v in cam.learning.values()):
            refs = {k: stat_reference(v) for k, v in cam.learning.items()}
            cam.calibrating = True
            self._start_calibration(camera, cam, refs)

    def _start_calibration(self, camera: str, cam: _Camera, refs: dict[str, StatReference]) -> None:
        """Calibrate charts for ``refs`` (called under the lock)."""
        epoch = self._epoch
        if not self._background:
            self._lock.release()
            try:
                self._calibrate(camera, cam, refs, epoch)
            finally:
                self._lock.acquire()
            return
        thread = threading.Thread(
            target=self._calibrate,
            args=(camera, cam, refs, epoch),
            name=f"drift-calibrate-{camera}",
            daemon=True,
        )
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        thread.start()

    def _calibrate(
        self, camera: str, cam: _Camera, refs: dict[str, StatReference], epoch: int
    ) -> None:
        lam = self.config.smoothing
        charts: dict[str, Chart] = {}
        for name, ref in refs.items():
            mean, std, z, w = null_distribution(name, ref)
            h = ewma_limit(z, w, lam, self._stat_rate, ref.n)
            charts[name] = Chart(mean, std, lam, h)
        with self._lock:
            if epoch != self._epoch or self._cameras.get(camera) is not cam:
                return
            cam.charts.update(charts)
            for name in refs:
                cam.learning.pop(name, None)
            cam.calibrating = False
        sigma_e = math.sqrt(lam / (2.0 - lam))
        log.info(
            "drift_reference",
            camera=camera,
            statistics={
                k: {
                    "mean": round(c.mean, 4),
                    "std": round(c.std, 4),
                    "limit": round(c.h / sigma_e, 2),
                }
                for k, c in charts.items()
            },
        )

    # -- reading -----------------------------------------------------------------------------

    def _view(self, camera: str, cam: _Camera) -> CameraDrift:
        sigma_e = math.sqrt(self.config.smoothing / (2.0 - self.config.smoothing))
        if cam.alarm:
            state = DriftState.ALARM
        elif cam.learning:
            state = DriftState.LEARNING
        else:
            state = DriftState.WATCHING
        left = max((self.config.learn_parts - len(v) for v in cam.learning.values()), default=0)
        return CameraDrift(
            camera=camera,
            state=state,
            score=cam.score,
            parts=cam.parts,
            alarms=cam.alarms,
            statistics={
                k: StatisticView(c.mean, c.smoothed, c.level, c.h / sigma_e)
                for k, c in cam.charts.items()
            },
            learning_left=max(left, 0),
            seq=cam.seq,
            part_id=cam.part_id,
        )

    def snapshot(self) -> dict[str, CameraDrift]:
        """Every camera's drift now."""
        with self._lock:
            return {k: self._view(k, c) for k, c in self._cameras.items()}

    def wait_calibrated(self, timeout: float) -> bool:
        """Wait for calibrations in progress (tests, benches); False if one is still running."""
        for thread in list(self._threads):
            thread.join(timeout)
        return not any(t.is_alive() for t in self._threads)

    def _collect(self) -> None:
        with self._lock:
            totals = dict(self._alarm_totals)
        for camera, total in totals.items():
            self._alarms.set_total(float(total), camera=camera)
        for camera, view in self.snapshot().items():
            self._score.set(view.score, camera=camera)
            self._alarm_gauge.set(1.0 if view.state is DriftState.ALARM else 0.0, camera=camera)
            self._learning.set(float(view.learning_left), camera=camera)
            for name, stat in view.statistics.items():
                self._level.set(stat.level, camera=camera, statistic=name)
