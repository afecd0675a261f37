"""The candidate beside the live model: fed after each live verdict, never in its way.

``ShadowRunner.observe`` is a ``ResultRouter`` observer: it runs on the live pipeline's threads
after the live verdict has been stored and published, and only appends the result to a small
queue (``shadow.queue`` frames; when full, the oldest or the newest is skipped and counted).
One feeder thread (``shadow-feeder``) hands the queued frames, one at a time and only while
the live line has no frame in flight (the candidate works in its idle time), to a second
``Pipeline`` that runs the candidate with the station's own post-processing and rules (the
cameras' ROI, corrections and zones; thresholds from the candidate's card or ``shadow.calibration``)
on threads ``shadow-*`` whose nice value is raised by ``shadow.nice``. So the live verdict never
waits for the candidate, and the candidate's verdict on a frame is the one the station would
give with the candidate live.

For each part the shadow verdict is compared with the live one (``pass``/``fail``), with the
pixel IoU of the two masks; a disagreement is archived (image, both masks, truth when known, a
side-by-side overlay, ``record.json``) under ``<state_dir>/shadow/disagreements/<stem>/``.
Everything is recorded in ``ShadowStore`` (``defectd shadow report``), counted in the
``defectd_shadow_*`` metrics and summarised on the MQTT ``shadow`` topic.

Over 600 lines because the candidate's set-up (its camera setups, calibration and config,
derived from the station's), the feeder thread, the comparison with the live verdict and the
disagreement archive all work on the runner's one queue, tally and store; the ``[shadow]``
settings (``config``) and the SQLite record with its report (``store``) live beside it.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
from numpy.typing import NDArray

from defectd.calibration.file import load_calibration
from defectd.clock import SYSTEM_CLOCK, Clock
from defectd.daemon.archive import part_stem, render_overlay
from defectd.daemon.config import ModelSection, StationConfig
from defectd.daemon.metrics import Registry
from defectd.daemon.shadow.config import ShadowConfig, shadow_dir
from defectd.daemon.shadow.store import (
    CONFUSION_KEYS,
    LIVE_ERROR,
    SKIPPED,
    VERDICTS,
    ModelRef,
    PartRecord,
    ShadowStore,
)
from defectd.daemon.station import (
    Calibrations,
    EngineOpener,
    LoadedModel,
    calibration_files,
    camera_setups,
    load_model,
)
from defectd.engines import open_engine
from defectd.errors import ConfigError
from defectd.log import get_logger
from defectd.pipeline.cameras import CameraSetup
from defectd.pipeline.inspection import Inspection, Verdict
from defectd.pipeline.runner import Pipeline, PipelineResult, lower_thread_priority
from defectd.publish.messages import timestamp

log = get_logger(__name__)
T = TypeVar("T")

FLUSH_S = 1.0  # counts of skipped frames go to the record this often
IDLE_POLL_S = 0.02  # how often the feeder looks whether the live line has gone idle (a
# shorter poll costs a saturated live line GIL hand-overs for frames the candidate skips anyway)


def mask_iou(a: NDArray[np.uint8], b: NDArray[np.uint8]) -> float:
    """Pixel IoU of two ``(H, W)`` uint8 {0, 1} masks; 1.0 when both are empty."""
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} and {b.shape}")
    union = int(np.count_nonzero(a | b))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(a & b)) / union


def part_classes(meta: Mapping[str, Any]) -> tuple[str, ...]:
    """The part's classes for the per-class tally: the truth's defect kinds when the frame
    carries truth (``good`` for a defect-free part), else ``unlabelled``."""
    defective = meta.get("truth_defective")
    if defective is None:
        return ("unlabelled",)
    if not defective:
        return ("good",)
    kinds = sorted({str(k) for k in meta.get("truth_kinds") or ()})
    return tuple(kinds) or ("defect",)


def candidate_setups(config: StationConfig, shadow: ShadowConfig) -> dict[str, CameraSetup]:
    """The cameras' setups for the candidate: the station's own (ROI, corrections, zones,
    scale), with the threshold of ``shadow.calibration`` when given.

    Raises ``ConfigError`` naming ``shadow.calibration`` when it has no threshold section.
    """
    setups = camera_setups(config)
    if shadow.calibration is None:
        # A camera's calibrated threshold names the live model: the candidate uses its card's.
        return setups
    try:
        th = load_calibration(shadow.calibration).threshold
    except ConfigError as exc:
        raise ConfigError(f"shadow.calibration: {exc}") from None
    if th is None:
        raise ConfigError(
            f"shadow.calibration: {shadow.calibration} has no threshold section "
            "(calibrate the candidate with `defectd calibrate threshold`)"
        )
    return {
        cam: dataclasses.replace(
            setup,
            threshold=th.pixel_threshold,
            min_area_px=th.min_area_px,
            threshold_model_sha256=th.model_sha256,
        )
        for cam, setup in setups.items()
    }


def check_calibration_names(shadow: ShadowConfig, candidate_card_sha256: str) -> None:
    """Raises ``ConfigError`` when ``shadow.calibration`` was calibrated for another model."""
    if shadow.calibration is None:
        return
    th = load_calibration(shadow.calibration).threshold
    if th is not None and th.model_sha256 and th.model_sha256 != candidate_card_sha256:
        raise ConfigError(
            f"shadow.calibration: {shadow.calibration}: its threshold was calibrated for model "
            f"{th.model_sha256[:12]}, not the candidate {candidate_card_sha256[:12]}"
        )


def candidate_calibrations(config: StationConfig, shadow: ShadowConfig) -> Calibrations:
    """The calibration files that can name the candidate's precision: ``shadow.calibration``
    when given, else the cameras' (which apply only if they name the candidate's sha256)."""
    if shadow.calibration is not None:
        return (("[shadow] candidate", shadow.calibration),)
    return calibration_files(config)


def candidate_config(config: StationConfig, shadow: ShadowConfig) -> StationConfig:
    """The station config with the candidate as its model (what ``load_model`` opens)."""
    section = ModelSection(
        path=shadow.path,
        backend=shadow.backend,
        precision=shadow.precision,
        threads=shadow.threads,
        cache_dir=config.model.cache_dir,
        warmup=1,
    )
    # One request on the candidate's own threads: it must not take a stream per core.
    pipeline = config.pipeline.model_copy(update={"mode": "latency"})
    return config.model_copy(update={"model": section, "pipeline": pipeline})


def _in_lowered_thread(nice: int, action: Callable[[], T]) -> T:
    """Run ``action`` on a short-lived thread with a raised nice value, so that threads a
    runtime starts while opening an engine inherit the lower priority; re-raises its error."""
    out: list[T] = []
    err: list[BaseException] = []

    def body() -> None:
        try:
            out.append(action())
        except BaseException as exc:  # handed back to the caller's thread
            err.append(exc)

    thread = threading.Thread(
        target=lower_thread_priority, args=(nice, body), name="shadow-open", daemon=True
    )
    thread.start()
    thread.join()
    if err:
        raise err[0]
    return out[0]


class _Tally:
    """This run's counts (for the metrics and the MQTT summary); guarded by the runner."""

    def __init__(self) -> None:
        self.confusion: Counter[str] = Counter({k: 0 for k in CONFUSION_KEYS})
        self.skipped = 0
        self.live_errors = 0
        self.shadow_errors = 0
        self.iou_sum = 0.0
        self.iou_n = 0
        self.per_class: dict[str, dict[str, int]] = {}
        self.per_camera: dict[str, dict[str, int]] = {}

    @property
    def parts(self) -> int:
        return sum(self.confusion.values())

    @property
    def agreement(self) -> float | None:
        parts = self.parts
        same = self.confusion["pass/pass"] + self.confusion["fail/fail"]
        return round(same / parts, 6) if parts else None

    def add(
        self, live: str, shadow: str, iou: float | None, camera: str, cls: tuple[str, ...]
    ) -> None:
        self.confusion[f"{live}/{shadow}"] += 1
        if iou is not None:
            self.iou_sum += iou
            self.iou_n += 1
        differ = int(live != shadow)
        for table, keys in ((self.per_class, cls), (self.per_camera, (camera,))):
            for key in keys:
                entry = table.setdefault(key, {"parts": 0, "disagreements": 0})
                entry["parts"] += 1
                entry["disagreements"] += differ


class ShadowRunner:
    """Shadow mode for one daemon run; see the module docstring.

    ``start(live)`` opens the candidate (raises ``ModelError``/``EngineError``/``ConfigError``
    naming ``shadow.*`` when it cannot) and starts its threads; ``observe`` is the router's
    observer (any thread, never blocks); ``stop(timeout)`` skips what still waits, lets the
    frame in hand finish within ``timeout``, publishes a last summary and closes the record.
    ``publish`` receives each summary (the publisher's ``publish_shadow``). ``live_busy``
    says whether the live line has frames in flight: the candidate then takes no new frame
    (it works in the live line's idle time; a saturated line leaves it none, and the frames
    waiting for it are skipped as newer ones arrive).
    """

    def __init__(
        self,
        config: StationConfig,
        *,
        registry: Registry,
        publish: Callable[[dict[str, Any]], None] | None = None,
        opener: EngineOpener = open_engine,
        clock: Clock = SYSTEM_CLOCK,
        wall: Callable[[], float] = time.time,
        live_busy: Callable[[], bool] | None = None,
    ) -> None:
        if config.shadow is None:
            raise ValueError("the station config has no [shadow] section")
        self.config = config
        self.shadow = config.shadow
        self._publish = publish
        self._live_busy = live_busy
        self._opener = opener
        self._clock = clock
        self._wall = wall
        self.dir = shadow_dir(config.state_dir)
        self._cond = threading.Condition()
        self._queue: deque[PipelineResult] = deque()
        self._pending: dict[int, PipelineResult] = {}
        self._uncounted: Counter[tuple[str, str, str]] = Counter()
        self._tally = _Tally()
        self._archived = 0
        self._stopping = False
        self._feeder: threading.Thread | None = None
        self._pipeline: Pipeline | None = None
        self._model: LoadedModel | None = None
        self._store: ShadowStore | None = None
        self._live = ModelRef("", "")
        self._since = 0.0
        self._next_publish = 0.0
        self._next_flush = 0.0
        self._metrics(registry)

    def _metrics(self, r: Registry) -> None:
        self.m_parts = r.counter(
            "defectd_shadow_parts_total",
            "Parts the shadow candidate inspected, by live and shadow verdict.",
            ["live", "shadow"],
        )
        self.m_skipped = r.counter(
            "defectd_shadow_skipped_total",
            "Frames the shadow candidate skipped because its queue was full (load).",
        )
        self.m_errors = r.counter(
            "defectd_shadow_errors_total",
            "Parts not compared because the live or the shadow verdict was error.",
            ["side"],
        )
        self.m_disagreements = r.counter(
            "defectd_shadow_disagreements_total",
            "Parts whose shadow verdict differs from the live one, by class (truth's defect "
            "kind, good, or unlabelled).",
            ["cls"],
        )
        self.m_agreement = r.gauge(
            "defectd_shadow_agreement",
            "Share of compared parts on which the shadow candidate agrees with the live verdict.",
        )
        self.m_iou = r.gauge(
            "defectd_shadow_iou_mean", "Mean pixel IoU of the live and shadow masks."
        )
        self.m_queue = r.gauge(
            "defectd_shadow_queue_depth", "Frames waiting for the shadow candidate."
        )
        self.m_info = r.gauge(
            "defectd_shadow_model_info",
            "The shadow candidate (value 1; the labels say which).",
            ["model", "sha256", "engine"],
        )
        r.add_collector(self._collect)

    # ------------------------------------------------------------------ life cycle

    @property
    def candidate(self) -> LoadedModel | None:
        return self._model

    def start(self, live: ModelRef) -> None:
        s = self.shadow
        self._live = live
        model = _in_lowered_thread(
            s.nice,
            lambda: load_model(
                candidate_config(self.config, s),
                opener=self._opener,
                calibrations=candidate_calibrations(self.config, s),
            ),
        )
        try:
            check_calibration_names(s, model.card.sha256)
            pipe_cfg = self.config.pipeline.model_copy(
                update={
                    "mode": "latency",
                    "max_latency_ms": 0.0,  # the candidate has no gate to meet
                    "admission": "block",
                    "max_in_flight": 1,
                    "preprocess_workers": 1,
                    "workers": 1,
                    "frame_queue": 1,
                    "job_queue": 1,
                    "result_queue": 1,
                    "max_delay_ms": 0.0,
                }
            )
            self._pipeline = Pipeline(
                model.engine,
                model.card,
                pipe_cfg,
                on_result=self._on_shadow,
                postprocess=self.config.postprocess,
                rules=self.config.rules,
                cameras=candidate_setups(self.config, s),
                clock=self._clock,
                model_sha256=model.executed_sha256,
                thread_prefix="shadow",
                nice=s.nice,
            )
            self._store = ShadowStore(self.config.state_dir)
        except BaseException:
            model.engine.close()
            raise
        self._model = model
        now = self._wall()
        self._since = now
        self._store.start_run(
            self.config.station,
            now,
            live,
            ModelRef(model.card.name, model.executed_sha256, str(s.path), model.engine.name),
        )
        self.m_info.set(
            1, model=model.card.name, sha256=model.executed_sha256, engine=model.engine.name
        )
        self._pipeline.start()
        self._next_publish = self._clock.monotonic() + s.publish_interval_s
        self._feeder = threading.Thread(
            target=lower_thread_priority,
            args=(s.nice, self._feed),
            name="shadow-feeder",
            daemon=True,
        )
        self._feeder.start()
        log.info(
            "shadow_started",
            candidate=model.card.name,
            sha256=model.executed_sha256,
            engine=model.engine.name,
            live=live.name,
            queue=s.queue,
            drop=s.drop,
            nice=s.nice,
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Idempotent; safe after a failed ``start``."""
        end = self._clock.monotonic() + timeout
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for result in left:  # never inspected by the candidate
            self._skip(result)
        if self._feeder is not None:
            self._feeder.join(max(0.1, end - self._clock.monotonic()))
        if self._pipeline is not None:
            self._pipeline.stop(max(0.1, end - self._clock.monotonic()))
        if self._model is not None:
            self._model.engine.close()
        self._flush_counts()
        if self._store is not None:
            self._publish_summary()
            self._store.close(self._wall())
            t = self._tally
            log.info(
                "shadow_stopped",
                parts=t.parts,
                skipped=t.skipped,
                agreement=t.agreement,
                archived=self._archived,
            )

    # ------------------------------------------------------------------ the live side

    def observe(self, result: PipelineResult) -> None:
        """The router's observer: queue the live result for the candidate (never waits)."""
        ins = result.inspection
        if ins.verdict is Verdict.ERROR:
            with self._cond:
                self._tally.live_errors += 1
                self._uncounted[(ins.camera, LIVE_ERROR, ins.model_sha256)] += 1
            self.m_errors.inc(side="live")
            return
        victim: PipelineResult | None = None
        with self._cond:
            if self._stopping:
                victim = result
            elif len(self._queue) >= self.shadow.queue:
                if self.shadow.drop == "oldest":
                    victim = self._queue.popleft()
                    self._queue.append(result)
                else:
                    victim = result
            else:
                # Only an empty queue has a feeder waiting for work; with frames already
                # queued it is waiting for the live line to go idle and polls on its own.
                if not self._queue:
                    self._cond.notify()
                self._queue.append(result)
        if victim is not None:
            self._skip(victim)

    def _skip(self, result: PipelineResult) -> None:
        ins = result.inspection
        with self._cond:
            self._tally.skipped += 1
            self._uncounted[(ins.camera, SKIPPED, ins.model_sha256)] += 1
        self.m_skipped.inc()

    # ------------------------------------------------------------------ the shadow side

    def _feed(self) -> None:
        pipeline = self._pipeline
        assert pipeline is not None
        while True:
            with self._cond:
                # A frame leaves the queue only when the candidate is free to take it, so
                # what waits is always in the queue (where a newer frame can replace it).
                while not self._stopping and (not self._queue or self._pending):
                    wait = min(self._next_flush, self._next_publish) - self._clock.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                if self._stopping:
                    return
                item = None
                if self._queue and not self._pending:
                    if self._live_is_busy():
                        self._cond.wait(IDLE_POLL_S)  # the live line comes first
                    else:
                        item = self._queue.popleft()
            self._housekeeping()
            if item is None:
                continue
            # A copy without the part's gate: the candidate has no deadline to meet.
            frame = dataclasses.replace(item.frame, deadline_ns=None)
            with self._cond:
                self._pending[id(frame)] = item
            pipeline.submit(frame)  # waits while the candidate inspects the previous frame

    def _live_is_busy(self) -> bool:
        return self._live_busy is not None and self._live_busy()

    def _housekeeping(self) -> None:
        now = self._clock.monotonic()
        if now >= self._next_flush:
            self._next_flush = now + FLUSH_S
            self._flush_counts()
        if now >= self._next_publish:
            self._next_publish = now + self.shadow.publish_interval_s
            self._publish_summary()

    def _on_shadow(self, shadow: PipelineResult) -> None:
        """The candidate's pipeline sink: compare with the live result and record."""
        with self._cond:
            live = self._pending.get(id(shadow.frame))
        if live is None:
            return
        try:
            self._compare(live, shadow)
        finally:
            with self._cond:
                self._pending.pop(id(shadow.frame), None)
                self._cond.notify_all()

    def _compare(self, live: PipelineResult, shadow: PipelineResult) -> None:
        sv = shadow.inspection
        if sv.rule == "error:stopped":
            self._skip(live)
            return
        lv = live.inspection
        meta = live.frame.meta
        iou = None
        if live.mask is not None and shadow.mask is not None:
            iou = round(mask_iou(live.mask, shadow.mask), 6)
        truth_defective = meta.get("truth_defective")
        truth = None if truth_defective is None else ("fail" if truth_defective else "pass")
        classes = part_classes(meta)
        live_v, shadow_v = lv.verdict.value, sv.verdict.value
        compared = shadow_v in VERDICTS
        archive: str | None = None
        if compared and live_v != shadow_v:
            archive = self._archive(live, shadow, iou, truth)
        record = PartRecord(
            t=lv.t_grab_wall,
            camera=lv.camera,
            seq=lv.seq,
            part_id=lv.part_id,
            live=live_v,
            shadow=shadow_v,
            iou=iou,
            truth=truth,
            cls=",".join(classes),
            live_model=ModelRef(lv.model_name, lv.model_sha256),
            archive=archive,
        )
        try:
            if self._store is not None:
                self._store.add_part(record)
        except Exception as exc:  # the record is best effort; the live line is untouched
            log.warning("shadow_record_failed", camera=lv.camera, seq=lv.seq, error=repr(exc))
        with self._cond:
            if compared:
                self._tally.add(live_v, shadow_v, iou, lv.camera, classes)
            else:
                self._tally.shadow_errors += 1
        if not compared:
            self.m_errors.inc(side="shadow")
            return
        self.m_parts.inc(live=live_v, shadow=shadow_v)
        if live_v != shadow_v:
            for cls in classes:
                self.m_disagreements.inc(cls=cls)
            log.info(
                "shadow_disagreement",
                camera=lv.camera,
                seq=lv.seq,
                part_id=lv.part_id,
                live=live_v,
                shadow=shadow_v,
                iou=iou,
                archive=archive,
            )

    def _archive(
        self, live: PipelineResult, shadow: PipelineResult, iou: float | None, truth: str | None
    ) -> str | None:
        """Write the disagreement's evidence; its folder, or None past ``max_archived`` or
        when writing failed (logged)."""
        with self._cond:
            if self._archived >= self.shadow.max_archived:
                return None
            self._archived += 1
        lv, sv = live.inspection, shadow.inspection
        folder = self.dir / "disagreements" / part_stem(lv)
        try:
            write_disagreement(folder, live, shadow, iou, truth)
        except (OSError, cv2.error, ValueError) as exc:
            log.warning("shadow_archive_failed", camera=lv.camera, seq=lv.seq, error=str(exc))
            return None
        log.debug(
            "shadow_archived", folder=str(folder), live=lv.verdict.value, shadow=sv.verdict.value
        )
        return str(folder)

    # ------------------------------------------------------------------ reporting

    def _flush_counts(self) -> None:
        with self._cond:
            counts, self._uncounted = self._uncounted, Counter()
        if not counts or self._store is None:
            return
        try:
            self._store.add_counts(
                self._wall(), [(cam, why, sha, n) for (cam, why, sha), n in counts.items()]
            )
        except Exception as exc:  # best effort, like every record of the candidate
            log.warning("shadow_record_failed", error=repr(exc))

    def summary(self) -> dict[str, Any]:
        """This run's counts: the body of the MQTT ``shadow`` message (``shadow.schema.json``)."""
        model = self._model
        with self._cond:
            t = self._tally
            body = {
                "since": timestamp(self._since),
                "live": {"name": self._live.name, "sha256": self._live.sha256},
                "candidate": {
                    "name": model.card.name if model else "",
                    "sha256": model.executed_sha256 if model else "",
                    "engine": model.engine.name if model else "",
                },
                "parts": t.parts,
                "skipped": t.skipped,
                "errors": {"live": t.live_errors, "shadow": t.shadow_errors},
                "agreement": t.agreement,
                "confusion": {k: t.confusion[k] for k in CONFUSION_KEYS},
                "iou_mean": round(t.iou_sum / t.iou_n, 6) if t.iou_n else None,
                "disagreements": t.parts - t.confusion["pass/pass"] - t.confusion["fail/fail"],
                "per_class": {k: dict(v) for k, v in sorted(t.per_class.items())},
                "per_camera": {k: dict(v) for k, v in sorted(t.per_camera.items())},
                "queue_depth": len(self._queue),
            }
        return body

    def set_live(self, live: ModelRef) -> None:
        """The live model changed (a reload): summaries name the new one."""
        with self._cond:
            self._live = live

    def _publish_summary(self) -> None:
        if self._publish is None:
            return
        try:
            self._publish(self.summary())
        except Exception as exc:  # an unreachable broker costs a summary, nothing else
            log.warning("shadow_summary_not_published", error=repr(exc))

    def _collect(self) -> None:
        with self._cond:
            agreement = self._tally.agreement
            iou = self._tally.iou_sum / self._tally.iou_n if self._tally.iou_n else None
            depth = len(self._queue)
        self.m_queue.set(depth)
        if agreement is not None:
            self.m_agreement.set(agreement)
        if iou is not None:
            self.m_iou.set(iou)


def _png(path: Path, image: NDArray[Any]) -> None:
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"cannot write {path}")


def write_disagreement(
    folder: Path,
    live: PipelineResult,
    shadow: PipelineResult,
    iou: float | None,
    truth: str | None,
) -> None:
    """``folder/``: ``image.png`` (the frame as grabbed), ``live_mask.png`` and
    ``shadow_mask.png`` (0/255), ``truth_mask.png`` when the frame carried truth,
    ``overlay.png`` (live left, shadow right) and ``record.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    image = live.frame.image
    shape = image.shape[:2]
    empty = np.zeros(shape, np.uint8)
    live_mask = live.mask if live.mask is not None else empty
    shadow_mask = shadow.mask if shadow.mask is not None else empty
    _png(folder / "image.png", image)
    _png(folder / "live_mask.png", live_mask * np.uint8(255))
    _png(folder / "shadow_mask.png", shadow_mask * np.uint8(255))
    truth_mask = live.frame.meta.get("truth_mask")
    if isinstance(truth_mask, np.ndarray):
        _png(folder / "truth_mask.png", (truth_mask > 0).astype(np.uint8) * np.uint8(255))
    overlay = np.hstack(
        [
            render_overlay(image, live_mask, live.inspection),
            render_overlay(image, shadow_mask, shadow.inspection),
        ]
    )
    if not cv2.imwrite(str(folder / "overlay.png"), overlay):
        raise OSError(f"cannot write {folder / 'overlay.png'}")
    lv, sv = live.inspection, shadow.inspection
    record = {
        "station": lv.station,
        "camera": lv.camera,
        "seq": lv.seq,
        "part_id": lv.part_id,
        "t_grab": timestamp(lv.t_grab_wall),
        "iou": iou,
        "truth": truth,
        "truth_kinds": list(live.frame.meta.get("truth_kinds") or ()),
        "live": _side(lv),
        "shadow": _side(sv),
    }
    (folder / "record.json").write_text(json.dumps(record, indent=2) + "\n")


def _side(ins: Inspection) -> dict[str, Any]:
    return {
        "verdict": ins.verdict.value,
        "rule": ins.rule,
        "reason": ins.reason,
        "model": {"name": ins.model_name, "sha256": ins.model_sha256},
        "result_id": ins.result_id,
        "defects": [
            {"area_px": int(d.area_px), "bbox": list(d.bbox), "score_max": float(d.score_max)}
            for d in ins.defects
        ],
    }


__all__ = [
    "ShadowRunner",
    "candidate_config",
    "candidate_setups",
    "check_calibration_names",
    "mask_iou",
    "part_classes",
    "write_disagreement",
]
