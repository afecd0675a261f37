"""The inspection pipeline: frames in, one verdict per frame out, on time or ``error``.

```
submit(frame) --[frames]--> preprocess threads --[jobs]--> inference thread (dynamic batcher,
engine.infer) --[results]--> post-processing threads --> decision rules --> on_result(result)
```
Every arrow is a bounded queue. ``submit`` is the ``on_frame`` callback of camera sources:
with ``admission="reject"`` it never waits (a full queue gives the frame an ``error`` verdict
at once); with ``"block"`` it waits for room (offline replay, benchmarks). Each frame has a
deadline (``max_latency_ms`` after grab; none when 0); a frame that misses it, or whose buffer
is corrupt, whose engine call fails or returns NaN, still gets a verdict: ``error``, with the
reason code in ``rule`` (``error:<code>``) and a one-line ``reason``. Each such event is counted
(``stats().errors``) and logged (rate-limited). A frame never leaves without a verdict: stop
gives whatever is still in flight the verdict ``error:stopped``.

``on_result`` is called once per submitted frame, from pipeline threads (post-processing
workers, or the submitting thread for admission errors): it must be thread-safe and quick
(hand the result to the publisher's durable queue). Results of one camera can leave out of
order when several post-processing workers run; ``seq`` and ``part_id`` identify them.

The module is over 600 lines on purpose: the stages share one lock, one in-flight table and
``_finish`` (the one place that gives a verdict), and splitting them would spread that
invariant over files; the pieces that stand alone live beside it (``batcher``, ``job``,
``preprocess``, ``postprocess``, ``rules``, ``tiling``, ``stats``).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from defectd.clock import SYSTEM_CLOCK, Clock
from defectd.engines.base import Engine, engine_concurrency
from defectd.errors import ConfigError, ModelError
from defectd.log import RateLimiter, get_logger
from defectd.model.card import ModelCard
from defectd.pipeline.batcher import POLL_S, Batch, Batcher
from defectd.pipeline.buffers import BufferPool, Scratch
from defectd.pipeline.cameras import DEFAULT_SETUP, CameraSetup
from defectd.pipeline.config import (
    PipelineConfig,
    PostprocessConfig,
    Rect,
    RulesConfig,
)
from defectd.pipeline.config import config_hash as hash_configs
from defectd.pipeline.failures import ErrorReason, FrameError
from defectd.pipeline.frame import Frame
from defectd.pipeline.inspection import Defect, Inspection, Verdict
from defectd.pipeline.job import Job, ModelSlot, SlotHold
from defectd.pipeline.postprocess import (
    Postprocessor,
    PostprocessParams,
    check_probabilities,
    keep_mask,
    load_zone_mask,
)
from defectd.pipeline.preprocess import Geometry, Preprocessor
from defectd.pipeline.rules import build_rules, check_rule_classes, decide
from defectd.pipeline.stats import Counters, LatencyWindow, PipelineStats
from defectd.pipeline.tiling import stitch
from defectd.pipeline.validate import frame_problem, usable_frame

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class PipelineResult:
    """What the sink receives for every submitted frame.

    ``mask`` is the ``(H, W)`` uint8 defect mask in full-frame pixels (a new array the
    receiver owns; zero outside the ROI), ``None`` for ``error`` verdicts: {0, 1} for a
    one-class model, the class index ``k + 1`` of ``classes[k]`` for a multi-class one.
    ``score`` is the highest defect probability in the ROI (before thresholding; what drift
    monitoring watches), ``None`` for ``error`` verdicts. ``classes`` are the card's classes
    of the model that inspected the frame, in channel order.
    """

    inspection: Inspection
    frame: Frame
    mask: NDArray[np.uint8] | None
    score: float | None = None
    classes: tuple[str, ...] = ("defect",)


ResultSink = Callable[[PipelineResult], None]


class PipelineState(Enum):
    """The pipeline's life cycle; only forward: new -> running -> draining -> stopping ->
    stopped (``drain``/``stop`` on a new pipeline go straight to draining)."""

    NEW = "new"  # built; frames submitted now wait in the queue for start()
    RUNNING = "running"
    DRAINING = "draining"  # intake closed for good; frames in flight finish
    STOPPING = "stopping"  # threads told to stop; what is left gets error:stopped
    STOPPED = "stopped"

    @property
    def accepting(self) -> bool:
        """Whether submitted frames are taken in (else they get ``error:stopped``)."""
        return self in (PipelineState.NEW, PipelineState.RUNNING)

    @property
    def running(self) -> bool:
        """Whether worker threads inspect frames."""
        return self in (PipelineState.RUNNING, PipelineState.DRAINING)


def lower_thread_priority(nice: int, then: Callable[[], None] | None = None) -> None:
    """Raise the calling thread's nice value by ``nice`` (Linux schedules threads one by one;
    elsewhere, or when refused, it stays as it is and says so in the log), then run ``then``."""
    try:
        tid = threading.get_native_id()
        now = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, now + nice))
    except (OSError, AttributeError) as exc:
        log.warning(
            "thread_priority_unchanged", thread=threading.current_thread().name, error=str(exc)
        )
    if then is not None:
        then()


def _ms(ns: int) -> float:
    return round(ns / 1e6, 3)


def _check_engine(engine: Engine, card: ModelCard) -> None:
    spec = engine.spec
    want = (card.input.channels, card.input.height, card.input.width)
    have = (spec.channels, spec.height, spec.width)
    if want != have:
        raise ModelError(
            f"model {card.name!r}: card input is {want[0]}x{want[1]}x{want[2]} (CxHxW) but "
            f"engine {engine.name} takes {have[0]}x{have[1]}x{have[2]}"
        )


class Pipeline:
    """Preprocess, batch, infer, post-process and decide; see the module docstring.

    ``engine`` and ``card`` describe the model (the engine's input spec must match the card);
    the caller owns engines and closes them (after ``stop``, or once the event returned by
    ``swap_engine`` is set). ``cameras`` maps camera ids to their ROI/scale/corrections.
    ``config_hash`` (default: a hash of the three config sections) and ``model_sha256`` (the
    sha256 of the file the engine executes, e.g. ``model.int8.onnx`` or a TensorRT plan;
    default: the card's) are stamped on every verdict. ``thread_prefix`` names the threads
    (``<prefix>-pre-0``, ``<prefix>-infer``, ``<prefix>-post-0``); ``nice`` > 0 lowers their
    scheduling priority by that much (Linux: per thread), for a pipeline that must yield the
    CPU to another (the shadow model's, ``defectd.daemon.shadow``).
    Raises ``ConfigError`` for settings that cannot work (naming the key) and ``ModelError``
    when engine and card disagree.
    """

    def __init__(
        self,
        engine: Engine,
        card: ModelCard,
        config: PipelineConfig | None = None,
        *,
        on_result: ResultSink,
        postprocess: PostprocessConfig | None = None,
        rules: RulesConfig | None = None,
        cameras: Mapping[str, CameraSetup] | None = None,
        config_hash: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
        model_sha256: str | None = None,
        thread_prefix: str = "defectd",
        nice: int = 0,
    ) -> None:
        self.config = cfg = config or PipelineConfig()
        self._thread_prefix = thread_prefix
        self._nice = nice
        self._clock = clock
        self.postprocess_config = post_cfg = postprocess or PostprocessConfig()
        self.rules_config = rules_cfg = rules or RulesConfig()
        _check_engine(engine, card)
        tile = min(card.input.height, card.input.width)
        if cfg.tile_overlap_px >= tile:
            raise ConfigError(
                f"pipeline.tile_overlap_px={cfg.tile_overlap_px} must be smaller than the "
                f"model input ({card.input.height}x{card.input.width})"
            )
        check_rule_classes(rules_cfg, card)
        self._rules = build_rules(rules_cfg)
        self._scale_rules = [r.name for r in self._rules if r.needs_scale]
        self._cameras = dict(cameras or {})
        for cam, setup in self._cameras.items():
            if self._scale_rules and setup.mm_per_px is None:
                raise ConfigError(
                    f"rules: {self._scale_rules[0]} needs mm², but camera {cam!r} has no "
                    "calibrated mm_per_px (calibrate the camera or use min_area_px)"
                )
        self._zone_masks: dict[Path, NDArray[np.uint8]] = {}
        for zone in (
            *post_cfg.ignore_zones,
            *(z for s in self._cameras.values() for z in s.ignore_zones),
        ):
            if isinstance(zone, Path) and zone not in self._zone_masks:
                self._zone_masks[zone] = load_zone_mask(zone)
        self.config_hash = config_hash or hash_configs(cfg, post_cfg, rules_cfg)
        self._on_result = on_result

        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._slot = ModelSlot(engine, card, 0, model_sha256 or card.sha256)
        self._retired: list[ModelSlot] = []
        self._inflight: dict[int, Job] = {}
        self._counters = Counters()
        self._latency = LatencyWindow(cfg.stats_window)
        # Repeated frame errors and sink failures: one warning per (event, key) per 5 s.
        self._warn_limit = RateLimiter(5.0, clock=clock.monotonic)
        self._state = PipelineState.NEW  # frames submitted before start wait in the queue
        self._stop = threading.Event()
        self._frames: queue.Queue[Job] = queue.Queue(cfg.frame_queue)
        self._jobs: queue.Queue[Job] = queue.Queue(cfg.job_queue)
        self._results: queue.Queue[Job] = queue.Queue(cfg.result_queue)
        self._pool = BufferPool(np.float32, max_free=cfg.job_queue + cfg.preprocess_workers + 2)
        self._params: dict[tuple[str, int], tuple[tuple[str, PostprocessParams], ...]] = {}
        self._keeps: dict[tuple[str, tuple[int, int], tuple[int, int, int, int]], Any] = {}
        self._threads: list[threading.Thread] = []
        # One inference thread per request the engine runs in parallel, so that every request
        # is kept busy; with several, a batch leaves as soon as nothing more is queued (the
        # next frame finds another free request, so waiting for it would only add latency).
        self._infer_threads = engine_concurrency(engine)
        self._batcher = Batcher(
            self._jobs,
            cfg.max_batch,
            cfg.max_delay_ms / 1e3,
            self._admit,
            clock,
            wait_for_more=self._infer_threads == 1,
        )
        self._warn_foreign_thresholds(card)

    # ------------------------------------------------------------------ life cycle

    @property
    def card(self) -> ModelCard:
        """The model card new frames are inspected with."""
        return self._slot.card

    @property
    def engine(self) -> Engine:
        return self._slot.engine

    def start(self) -> None:
        """Start the worker threads; frames submitted before are inspected from now on."""
        with self._lock:
            if self._state is not PipelineState.NEW:
                raise RuntimeError(f"pipeline is {self._state.value}; a pipeline starts once")
            self._state = PipelineState.RUNNING
        cfg = self.config
        prefix = self._thread_prefix
        targets: list[tuple[str, Callable[[], None]]] = [
            (f"{prefix}-pre-{i}", self._preprocess_loop) for i in range(cfg.preprocess_workers)
        ]
        targets += [(f"{prefix}-infer-{i}", self._infer_loop) for i in range(self._infer_threads)]
        targets += [(f"{prefix}-post-{i}", self._post_loop) for i in range(cfg.workers)]
        for name, loop in targets:
            target = partial(lower_thread_priority, self._nice, loop) if self._nice > 0 else loop
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info(
            "pipeline_started",
            model=self.card.name,
            engine=self.engine.name,
            mode=cfg.mode,
            inference_threads=self._infer_threads,
            max_batch=min(cfg.max_batch, self.engine.spec.max_batch),
            max_delay_ms=cfg.max_delay_ms,
            max_latency_ms=cfg.deadline_ms,
            admission=cfg.admission,
            config_hash=self.config_hash,
        )

    def submit(self, frame: Frame) -> None:
        """Hand in one frame (the sources' ``on_frame``). Never raises for a bad frame: every
        frame gets exactly one verdict through ``on_result``."""
        cfg = self.config
        now = self._clock.monotonic_ns()
        camera = getattr(frame, "camera", None)
        setup = DEFAULT_SETUP
        if isinstance(camera, str):
            setup = self._cameras.get(camera, DEFAULT_SETUP)
        problem = frame_problem(frame, setup)
        if problem is not None:
            # Malformed fields must not raise here: a copy with safe values carries the verdict.
            frame = usable_frame(frame)
        limit_ms = cfg.deadline_ms
        deadline = None if limit_ms is None else frame.t_host_ns + int(limit_ms * 1e6)
        own = frame.deadline_ns  # the part's gate, when the line gave one
        if own is not None:
            deadline = own if deadline is None else min(deadline, own)
        job = Job(frame, setup, now, deadline)
        limit = cfg.max_in_flight
        block = cfg.admission == "block"
        with self._idle:
            # "block" waits here for a free slot; the frame counts as in flight only after.
            while block and limit and self._state.accepting and len(self._inflight) >= limit:
                self._idle.wait(POLL_S)
            self._counters.submitted += 1
            self._inflight[id(job)] = job
            accepting = self._state.accepting
            state = self._state
            over = limit is not None and len(self._inflight) > limit
        if not accepting:
            self._fail(job, ErrorReason.STOPPED, f"pipeline is {state.value}, not accepting")
            return
        if problem is not None:
            self._fail(job, ErrorReason.CORRUPT_FRAME, problem)
            return
        if not block:
            if over:
                self._fail(
                    job,
                    ErrorReason.QUEUE_FULL,
                    f"{limit} frames in flight (max_in_flight): frames arrive faster than "
                    "they are inspected",
                )
                return
            try:
                self._frames.put_nowait(job)
            except queue.Full:
                self._fail(
                    job,
                    ErrorReason.QUEUE_FULL,
                    f"frame queue full ({cfg.frame_queue} frames): frames arrive faster "
                    "than they are inspected",
                )
            return
        while True:
            try:
                self._frames.put(job, timeout=POLL_S)
                return
            except queue.Full:
                if not self._state.accepting:
                    self._fail(job, ErrorReason.STOPPED, "pipeline stopped while waiting")
                    return

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait up to ``timeout`` s until every frame submitted so far has its verdict, keeping
        intake open. True when nothing is left in flight."""
        end = self._clock.monotonic() + timeout
        with self._idle:
            while self._inflight:
                left = end - self._clock.monotonic()
                if left <= 0:
                    break
                self._idle.wait(min(left, 0.5))
            return not self._inflight

    def drain(self, timeout: float = 10.0) -> bool:
        """Stop accepting frames and wait up to ``timeout`` s until every frame submitted so
        far has its verdict. True when nothing is left in flight. Intake stays closed."""
        end = self._clock.monotonic() + timeout
        with self._idle:
            started = self._state is not PipelineState.NEW
            if self._state.accepting:
                self._state = PipelineState.DRAINING
            while self._inflight:
                left = end - self._clock.monotonic()
                if left <= 0 or not started:
                    break
                self._idle.wait(min(left, 0.5))
            return not self._inflight

    def stop(self, timeout: float = 5.0) -> bool:
        """Drain for up to ``timeout`` s, stop the threads, and give every frame still in
        flight the verdict ``error:stopped``. True when everything was inspected. Idempotent."""
        end = self._clock.monotonic() + timeout
        drained = self.drain(timeout)
        with self._lock:
            if self._state is PipelineState.STOPPED:
                return drained
            self._state = PipelineState.STOPPING
        self._stop.set()
        # Every thread sees the stop within POLL_S: they share what is left of ``timeout``
        # (at least a few polls, however long the drain took).
        join_end = max(end, self._clock.monotonic() + 4 * POLL_S)
        for thread in self._threads:
            thread.join(timeout=max(0.0, join_end - self._clock.monotonic()))
            if thread.is_alive():
                log.error("pipeline_thread_stuck", thread=thread.name)
        with self._lock:
            leftover = list(self._inflight.values())
        for job in leftover:
            self._fail(job, ErrorReason.STOPPED, "pipeline stopped before the frame was inspected")
        with self._lock:
            self._state = PipelineState.STOPPED
            slot = self._slot
            retired, self._retired = self._retired, []
        slot.retire()
        for old in (*retired, slot):
            old.close_sized()
        c = self._counters
        log.info(
            "pipeline_stopped",
            submitted=c.submitted,
            completed=c.completed,
            errors=dict(c.errors),
            left_uninspected=len(leftover),
        )
        return drained and not leftover

    def swap_engine(
        self, engine: Engine, card: ModelCard, model_sha256: str | None = None
    ) -> threading.Event:
        """Inspect frames preprocessed from now on with ``engine``/``card`` (``model_sha256``:
        of the file the engine executes, default the card's); frames already preprocessed
        finish on the old engine. Returns an event set once the old engine is no longer used
        (then the caller may close it). Raises ``ModelError`` when the engine does not take
        the card's input."""
        _check_engine(engine, card)
        check_rule_classes(self.rules_config, card)
        self._warn_foreign_thresholds(card)
        with self._lock:
            old = self._slot
            self._slot = ModelSlot(engine, card, old.generation + 1, model_sha256 or card.sha256)
            self._counters.swaps += 1
            # Engines the old slot made for full-frame windows: closed once it is idle.
            idle = [s for s in self._retired if s.idle.is_set()]
            self._retired = [s for s in self._retired if not s.idle.is_set()] + [old]
        for done in idle:
            done.close_sized()
        old.retire()
        log.info(
            "model_swapped",
            old_model=old.card.name,
            old_sha256=old.sha256,
            model=card.name,
            sha256=model_sha256 or card.sha256,
            engine=engine.name,
        )
        return old.idle

    def _warn_foreign_thresholds(self, card: ModelCard) -> None:
        for cam, setup in self._cameras.items():
            if setup.threshold is not None and not setup.calibrated_for(card.sha256):
                log.warning(
                    "calibrated_threshold_ignored",
                    camera=cam,
                    model=card.name,
                    sha256=card.sha256,
                    calibrated_for=setup.threshold_model_sha256,
                    reason="the threshold was calibrated for another model; using the card's",
                )

    @property
    def cameras(self) -> Mapping[str, CameraSetup]:
        """Each camera's setup (ROI, scale, corrections, calibrated threshold); read-only."""
        return MappingProxyType(self._cameras)

    def stats(self) -> PipelineStats:
        """Counters since start, queue depths, fps and latency percentiles (thread-safe)."""
        with self._lock:
            c = self._counters
            snapshot = (
                c.submitted,
                c.completed,
                len(self._inflight),
                dict(c.verdicts),
                dict(c.errors),
                {cam: dict(v) for cam, v in c.cameras.items()},
                c.batches,
                c.tiles,
                c.sink_errors,
                c.swaps,
                self._state,
            )
            slot = self._slot
        submitted, completed, inflight, verdicts, errors, cams, batches, tiles, sink, swaps, st = (
            snapshot
        )
        cfg = self.config
        return PipelineStats(
            running=st.running,
            submitted=submitted,
            completed=completed,
            in_flight=inflight,
            verdicts=verdicts,
            errors=errors,
            cameras=cams,
            queues={
                "frames": self._frames.qsize(),
                "jobs": self._jobs.qsize(),
                "results": self._results.qsize(),
            },
            queue_capacity={
                "frames": cfg.frame_queue,
                "jobs": cfg.job_queue,
                "results": cfg.result_queue,
            },
            batches=batches,
            tiles=tiles,
            mean_batch=round(tiles / batches, 3) if batches else 0.0,
            fps=round(self._latency.fps(self._clock.monotonic()), 2),
            latency_ms=self._latency.percentiles(),
            sink_errors=sink,
            swaps=swaps,
            model=slot.card.name,
            model_sha256=slot.sha256,
            engine=slot.engine.name,
        )

    # ------------------------------------------------------------------ verdicts

    def _slot_of(self, job: Job) -> ModelSlot:
        """The model ``job`` ran on, or (a job that failed before it had one) the current one:
        the model its verdict names."""
        return job.slot if job.slot is not None else self._slot

    def _inspection(
        self,
        job: Job,
        verdict: Verdict,
        rule: str,
        *,
        defects: tuple[Defect, ...] = (),
        reason: str | None = None,
        latencies: dict[str, float] | None = None,
    ) -> Inspection:
        frame = job.frame
        slot = self._slot_of(job)
        card = slot.card
        image = frame.image
        return Inspection(
            station=frame.station,
            camera=frame.camera,
            seq=frame.seq,
            verdict=verdict,
            defects=defects,
            rule=rule,
            reason=reason,
            part_id=frame.part_id,
            model_name=card.name,
            model_sha256=slot.sha256,
            config_hash=self.config_hash,
            t_grab_wall=frame.t_wall,
            t_grab_ns=frame.t_host_ns,
            latencies_ms=latencies or {"total": _ms(self._clock.monotonic_ns() - frame.t_host_ns)},
            image_shape=tuple(image.shape) if isinstance(image, np.ndarray) else (),
        )

    def _fail(self, job: Job, code: ErrorReason, detail: str) -> None:
        inspection = self._inspection(
            job, Verdict.ERROR, f"error:{code.value}", reason=f"{code.value}: {detail}"
        )
        if self._finish(job, inspection, None, code):
            self._warning(
                "frame_error",
                code.value,
                reason=code.value,
                camera=job.frame.camera,
                seq=job.frame.seq,
                detail=detail,
            )

    def _finish(
        self,
        job: Job,
        inspection: Inspection,
        mask: NDArray[np.uint8] | None,
        code: ErrorReason | None = None,
        score: float | None = None,
    ) -> bool:
        """Deliver the one verdict of ``job``; False when it already had one."""
        with self._lock:
            if job.finished:
                return False
            job.finished = True
            c = self._counters
            c.completed += 1
            c.verdicts[inspection.verdict.value] += 1
            c.cameras[inspection.camera][inspection.verdict.value] += 1
            if code is not None:
                c.errors[code.value] += 1
        try:
            classes = self._slot_of(job).card.classes
            self._on_result(PipelineResult(inspection, job.frame, mask, score, classes))
        except Exception as exc:  # a broken sink must not stop the line
            with self._lock:
                self._counters.sink_errors += 1
            self._warning("sink_failed", type(exc).__name__, error=str(exc))
        with self._idle:
            self._inflight.pop(id(job), None)
            self._idle.notify_all()  # drain/wait_idle and submit waiting for a free slot
        return True

    def _warning(self, event: str, key: str, **fields: Any) -> None:
        suppressed = self._warn_limit.admit((event, key))
        if suppressed is not None:
            log.warning(event, suppressed=suppressed, **fields)

    def _deadline_detail(self, job: Job, now_ns: int, where: str) -> str:
        age = (now_ns - job.frame.t_host_ns) / 1e6
        limit = self.config.max_latency_ms
        if job.deadline_ns is not None:
            limit = (job.deadline_ns - job.frame.t_host_ns) / 1e6
        return f"{age:.1f} ms since grab {where}, deadline {limit:g} ms"

    # ------------------------------------------------------------------ stages

    def _acquire_slot(self) -> ModelSlot:
        with self._lock:
            slot = self._slot
            slot.acquire()
        return slot

    def _put(self, q: queue.Queue[Job], job: Job) -> None:
        while not self._stop.is_set():
            try:
                q.put(job, timeout=POLL_S)
                return
            except queue.Full:
                continue

    def _preprocess_loop(self) -> None:
        pre: Preprocessor | None = None
        while not self._stop.is_set():
            try:
                job = self._frames.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if job.finished:
                continue
            now = job.t_pre_start_ns = self._clock.monotonic_ns()
            if job.expired(now):
                self._fail(job, ErrorReason.DEADLINE, self._deadline_detail(job, now, "in queue"))
                continue
            slot = self._acquire_slot()
            job.take_slot(slot)
            if pre is None or pre.card is not slot.card:
                windows = engine_concurrency(slot.engine) if hasattr(slot.engine, "at_size") else 0
                pre = Preprocessor(
                    slot.card,
                    self.config,
                    self._pool,
                    windows=windows,
                    float32=getattr(slot.engine, "precision", "fp32") == "fp32",
                )
            try:
                prepared = pre(job.frame, job.setup)
            except FrameError as failure:
                job.leave_model(SlotHold.DROPPED)
                self._fail(job, failure.code, failure.detail)
                continue
            except Exception as exc:  # a bug or an unexpected buffer must not stop the line
                job.leave_model(SlotHold.DROPPED)
                self._fail(job, ErrorReason.PREPROCESS, f"{type(exc).__name__}: {exc}")
                continue
            job.prepared = prepared
            job.n_tiles = prepared.geometry.plan.count
            job.outputs = [None] * job.n_tiles
            job.t_pre_end_ns = self._clock.monotonic_ns()
            self._put(self._jobs, job)

    def _admit(self, job: Job) -> bool:
        now = self._clock.monotonic_ns()
        if job.finished or job.expired(now):
            job.leave_model(SlotHold.DROPPED)
            if not job.finished:
                where = self._deadline_detail(job, now, "before inference")
                self._fail(job, ErrorReason.DEADLINE, where)
            return False
        return True

    def _infer_loop(self) -> None:
        buffers = Scratch()  # this thread's batch buffer: batches of other threads may be running
        while True:
            batch = self._batcher.next_batch(self._stop, buffers)
            if batch is None:
                return
            self._run_batch(batch)

    def _run_batch(self, batch: Batch) -> None:
        # Several inference threads may run batches holding tiles of one frame: the per-job
        # bookkeeping below is done under the pipeline lock, verdicts and queueing after it.
        slot = batch.slot
        t0 = self._clock.monotonic_ns()
        engine = slot.engine
        try:
            engine = slot.engine_for(*batch.data.shape[2:])
            out = engine.infer(batch.data)
            want = (batch.data.shape[0], len(slot.card.classes), *batch.data.shape[2:])
            if not isinstance(out, np.ndarray) or out.shape != want or out.dtype != np.float32:
                got = (out.shape, out.dtype) if isinstance(out, np.ndarray) else type(out)
                raise ValueError(f"engine returned {got}, expected float32 {want}")
        except Exception as exc:  # the engine may raise anything; the frames still get verdicts
            detail = f"{engine.name}: {type(exc).__name__}: {exc}".replace("\n", " ")
            with self._lock:
                failed = [job for job, _ in batch.entries if job.leave_model(SlotHold.DROPPED)]
            for job in failed:
                self._fail(job, ErrorReason.ENGINE, detail[:500])
            return
        t1 = self._clock.monotonic_ns()
        complete: list[Job] = []
        with self._lock:
            self._counters.batches += 1
            self._counters.tiles += len(batch.entries)
            for k, (job, tile) in enumerate(batch.entries):
                if job.dropped:
                    continue
                # (tile_h, tile_w) for a one-class model, (K, tile_h, tile_w) for K classes.
                job.outputs[tile] = out[k, 0] if out.shape[1] == 1 else out[k]
                if not job.t_infer_start_ns or t0 < job.t_infer_start_ns:
                    job.t_infer_start_ns = t0
                job.t_infer_end_ns = max(job.t_infer_end_ns, t1)
                job.tiles_done += 1
                if job.tiles_done == job.n_tiles:
                    job.leave_model(SlotHold.INFERRED)
                    if not job.finished:
                        complete.append(job)
        for job in complete:
            self._put(self._results, job)

    def _post_loop(self) -> None:
        post = Postprocessor()
        scratch = Scratch()
        while not self._stop.is_set():
            try:
                job = self._results.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if job.finished:
                continue
            self._postprocess(job, post, scratch)

    def _resolve_params(
        self, camera: str, setup: CameraSetup, slot: ModelSlot
    ) -> tuple[tuple[str, PostprocessParams], ...]:
        """``(class, params)`` per class of the card, in channel order. Threshold and min area:
        the station's ``[postprocess]`` value, else the camera's calibration (per class for a
        multi-class model) when it was made for this model, else the card's (per class)."""
        key = (camera, slot.generation)
        resolved = self._params.get(key)
        if resolved is not None:
            return resolved
        cfg, card = self.postprocess_config, slot.card
        calibrated = setup.calibrated_for(card.sha256)
        out = []
        for cls in card.classes:
            point = card.point(cls)
            own = setup.class_points.get(cls) if calibrated else None
            threshold = cfg.threshold
            if threshold is None:
                if own is not None:
                    threshold = own[0]
                elif calibrated and setup.threshold and not card.multiclass:
                    threshold = setup.threshold
                else:
                    threshold = point.threshold
            min_area = cfg.min_area_px
            if min_area is None:
                min_area = point.min_area_px
                if own is not None:
                    min_area = own[1]
                elif calibrated and setup.min_area_px is not None and not card.multiclass:
                    min_area = setup.min_area_px
            params = PostprocessParams(
                threshold=threshold,
                min_area_px=min_area,
                open_px=cfg.open_px,
                close_px=cfg.close_px,
                max_defects=cfg.max_defects,
                mm_per_px=setup.mm_per_px,
            )
            out.append((cls, params))
            log.info(
                "postprocess_params",
                camera=camera,
                model=card.name,
                **({"cls": cls} if card.multiclass else {}),
                threshold=threshold,
                min_area_px=min_area,
                mm_per_px=setup.mm_per_px,
            )
        resolved = tuple(out)
        with self._lock:
            self._params[key] = resolved
        return resolved

    def _keep(self, camera: str, setup: CameraSetup, geo: Geometry) -> NDArray[np.uint8] | None:
        key = (camera, geo.frame_shape, geo.roi)
        if key in self._keeps:
            keep: NDArray[np.uint8] | None = self._keeps[key]
            return keep
        zones_cfg = (*self.postprocess_config.ignore_zones, *setup.ignore_zones)
        zones: list[Rect | NDArray[np.uint8]] = [
            self._zone_masks[z] if isinstance(z, Path) else z for z in zones_cfg
        ]
        names = [
            f"camera {camera!r} ignore mask" if isinstance(z, np.ndarray) else str(z)
            for z in zones_cfg
        ]
        try:
            keep = keep_mask(zones, geo.frame_shape, geo.roi, names)
        except ValueError as exc:
            raise FrameError(ErrorReason.POSTPROCESS, str(exc)) from exc
        with self._lock:
            self._keeps[key] = keep
        return keep

    def _postprocess(self, job: Job, post: Postprocessor, scratch: Scratch) -> None:
        t0 = job.t_post_start_ns = self._clock.monotonic_ns()
        if job.expired(t0):
            self._fail(job, ErrorReason.DEADLINE, self._deadline_detail(job, t0, "after inference"))
            return
        slot, prepared = job.slot, job.prepared
        assert slot is not None and prepared is not None
        geo = prepared.geometry
        try:
            per_class = self._resolve_params(job.frame.camera, job.setup, slot)
            if self._scale_rules and per_class[0][1].mm_per_px is None:
                raise FrameError(
                    ErrorReason.NOT_CALIBRATED,
                    f"camera {job.frame.camera!r}: rule {self._scale_rules[0]} needs mm² but "
                    "the camera has no calibrated mm_per_px",
                )
            plan = geo.plan
            fitted = scratch.get("fitted", geo.fitted, np.float32)
            tiles = [t for t in job.outputs if t is not None]
            keep = self._keep(job.frame.camera, job.setup, geo)
            x, y, w, h = geo.roi
            mask = np.zeros(geo.frame_shape, np.uint8)
            roi_out = mask[y : y + h, x : x + w]
            # A multi-class mask holds the class index (k + 1) of the most probable class
            # whose own decision holds the pixel; a one-class mask is {0, 1} as it always was.
            best = scratch.get("best", geo.roi_shape, np.float32) if len(per_class) > 1 else None
            if best is not None:
                best.fill(-1.0)
            found: list[Defect] = []
            score = 0.0  # the highest probability of any class in the ROI (drift monitoring)
            # The engine's map as it is when one tile covers the fitted image, and the fitted
            # map as it is when fitting changed nothing (no copies of a whole frame for nothing).
            whole = plan.count == 1 and (plan.tile_h, plan.tile_w) == geo.fitted
            restore = geo.fitted != geo.roi_shape or (geo.mode != "tile" and not geo.fit.identity)
            for k, (cls, params) in enumerate(per_class):
                channel = tiles if len(per_class) == 1 else [t[k] for t in tiles]
                if whole:
                    prob = channel[0]
                else:
                    tile_buf = scratch.get("tile", (plan.tile_h, plan.tile_w), np.float32)
                    prob = stitch(plan, channel, fitted, tile_buf)
                if restore:
                    prob = geo.restore(prob, scratch.get("roi", geo.roi_shape, np.float32))
                bad = check_probabilities(prob)
                if bad is not None:
                    raise FrameError(
                        ErrorReason.BAD_OUTPUT, bad if best is None else f"{cls}: {bad}"
                    )
                if prob.size:
                    score = max(score, float(prob.max()))
                class_defects, roi_mask = post(prob, params, keep, offset=(x, y), cls=cls)
                found.extend(class_defects)
                if best is None:
                    roi_out[...] = roi_mask
                    continue
                wins = (roi_mask > 0) & (prob > best)
                roi_out[wins] = k + 1
                best[wins] = prob[wins]
            defects = tuple(found)
            if len(per_class) > 1:
                cap = per_class[0][1].max_defects
                defects = tuple(sorted(found, key=lambda d: -d.area_px)[:cap])
            verdict, rule = decide(self._rules, defects)
        except FrameError as failure:
            self._fail(job, failure.code, failure.detail)
            return
        except Exception as exc:  # a bug must cost one verdict (error), not the line
            self._fail(job, ErrorReason.POSTPROCESS, f"{type(exc).__name__}: {exc}")
            return
        t1 = self._clock.monotonic_ns()
        if job.expired(t1):
            self._fail(job, ErrorReason.DEADLINE, self._deadline_detail(job, t1, "at verdict"))
            return
        frame = job.frame
        latencies = {
            "intake": _ms(job.t_submit_ns - frame.t_host_ns),
            "queue": _ms(job.t_pre_start_ns - job.t_submit_ns),
            "preprocess": _ms(job.t_pre_end_ns - job.t_pre_start_ns),
            "batch_wait": _ms(job.t_infer_start_ns - job.t_pre_end_ns),
            "infer": _ms(job.t_infer_end_ns - job.t_infer_start_ns),
            "post_wait": _ms(t0 - job.t_infer_end_ns),
            "postprocess": _ms(t1 - t0),
            "total": _ms(t1 - frame.t_host_ns),
        }
        inspection = self._inspection(job, verdict, rule, defects=defects, latencies=latencies)
        job.outputs = []
        if self._finish(job, inspection, mask, score=score):
            self._latency.record(latencies, t1 / 1e9)
