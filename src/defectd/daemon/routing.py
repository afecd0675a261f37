"""Where each verdict goes once the pipeline has given it: the result router.

The pipeline calls ``ResultRouter`` once per frame, from its threads. In this order it commits
the result to the durable outbox (the publisher), appends its id to the result ledger, counts it
in the metrics and in the station's progress, logs it, hands the image to the archive and calls
the observers. Only the outbox commit can refuse a result; every later step is best effort and
never costs a verdict.

``Progress`` holds the counters the watchdog and the health report read (frames submitted,
results, frames the model inspected and when it last did); the router and the camera intake
write them, under its lock.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defectd.daemon.archive import Archive
from defectd.daemon.telemetry import StationMetrics, error_reason
from defectd.errors import ConfigError, DefectdError
from defectd.log import get_logger
from defectd.pipeline.inspection import Inspection, Verdict
from defectd.pipeline.runner import PipelineResult
from defectd.publish.failsafe import NotDurableError
from defectd.publish.mqtt import Publisher

log = get_logger(__name__)

ResultObserver = Callable[[PipelineResult], None]

# Error verdicts that say nothing about whether the model runs: they are given without it.
NOT_PROGRESS = frozenset({"queue_full", "deadline", "stopped"})


@dataclass(frozen=True, slots=True)
class ProgressSnapshot:
    """The station's progress counters at one instant (monotonic seconds).

    ``last_inspected`` is 0.0 until the model inspects a frame; ``epoch`` is when the
    current generation started taking frames (a stall is measured from the later of the two).
    """

    submitted: int = 0
    results: int = 0
    inspected: int = 0
    last_inspected: float = 0.0
    epoch: float = 0.0
    verdicts: dict[str, int] = field(default_factory=dict)

    @property
    def in_flight(self) -> int:
        return self.submitted - self.results


class Progress:
    """Thread-safe counters of frames submitted, results given and frames inspected."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._submitted = 0
        self._results = 0
        self._inspected = 0
        self._last_inspected = 0.0
        self._epoch = clock()
        self._verdicts: dict[str, int] = {v.value: 0 for v in Verdict}

    def restart_epoch(self) -> None:
        """A (new) pipeline starts taking frames: stalls are measured from now."""
        with self._lock:
            self._epoch = self._clock()

    def frame_submitted(self) -> None:
        with self._lock:
            self._submitted += 1

    def busy(self) -> bool:
        """Whether frames are in flight (lock-free: a quick poll for shadow mode's feeder)."""
        return self._submitted > self._results

    def result(self, ins: Inspection) -> None:
        inspected = ins.verdict is not Verdict.ERROR or error_reason(ins) not in NOT_PROGRESS
        with self._lock:
            self._results += 1
            self._verdicts[ins.verdict.value] += 1
            if inspected:
                self._inspected += 1
                self._last_inspected = self._clock()

    def snapshot(self) -> ProgressSnapshot:
        with self._lock:
            return ProgressSnapshot(
                submitted=self._submitted,
                results=self._results,
                inspected=self._inspected,
                last_inspected=self._last_inspected,
                epoch=self._epoch,
                verdicts=dict(self._verdicts),
            )


class Ledger:
    """An append-only file of result ids, one per line, for batch runs that must prove that
    every part got exactly one stored verdict."""

    def __init__(self, path: Path) -> None:
        """Raises ``ConfigError`` naming ``daemon.result_ledger`` when it cannot be opened."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise ConfigError(f"daemon.result_ledger: cannot open {path}: {exc}") from None

    def append(self, result_id: str) -> None:
        """Raises ``OSError`` when the line cannot be written."""
        if self._fd is not None:
            # One write on an O_APPEND descriptor: whole lines, even across a SIGKILL.
            os.write(self._fd, f"{result_id}\n".encode())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ResultRouter:
    """The pipeline's ``on_result``: fans each result out to the station's sinks.

    The sinks (``publisher``, ``ledger``, ``archive``) are attached by the service once they
    are started, before the first frame; until then a result is only counted and logged.
    Called from pipeline threads: every sink is thread-safe and quick.
    """

    def __init__(
        self,
        metrics: StationMetrics,
        progress: Progress,
        observers: Sequence[ResultObserver] = (),
    ) -> None:
        self.metrics = metrics
        self.progress = progress
        self.publisher: Publisher | None = None
        self.ledger: Ledger | None = None
        self.archive: Archive | None = None
        # The line contract (``daemon.line``): adds each verdict's part gate and correlation.
        self.stamp: Callable[[PipelineResult], Inspection] | None = None
        self._observers = tuple(observers)

    def __call__(self, result: PipelineResult) -> None:
        if self.stamp is not None:
            result = dataclasses.replace(result, inspection=self.stamp(result))
        ins = result.inspection
        commit_ms = self._store(ins)
        self.metrics.observe(ins, commit_ms)
        self.progress.result(ins)
        log_result(ins)
        if self.archive is not None:
            meta = result.frame.meta
            self.archive.submit(
                ins,
                result.frame.image,
                result.mask,
                truth=meta.get("truth_mask"),
                truth_kinds=meta.get("truth_kinds") or (),
                classes=result.classes,
                truth_labels=meta.get("truth_labels"),
                truth_classes=meta.get("truth_classes") or (),
            )
        for observer in self._observers:
            try:
                observer(result)
            except Exception as exc:  # an observer must not cost a verdict
                log.warning("result_observer_failed", error=repr(exc))

    def no_frame(self, ins: Inspection) -> None:
        """A part the line announced but no frame showed (``error:no_frame``): stored,
        published, counted and logged like any verdict. Not a pipeline result, so the
        progress counters (frames in flight) leave it out."""
        self.metrics.observe(ins, self._store(ins))
        log_result(ins)

    def _store(self, ins: Inspection) -> float | None:
        """Commit ``ins`` to the outbox and append it to the ledger; the commit time in ms,
        None when there is no publisher or the commit failed (counted and logged)."""
        if self.publisher is None:
            return None
        t0 = time.perf_counter_ns()
        try:
            self.publisher.submit(ins)
        except DefectdError as exc:
            # NotDurableError: the publisher already sent the fail-safe reject directly
            # and raised the alarm; the health report and the watchdog now say so.
            self.metrics.errors.inc(reason="publish")
            failsafe = isinstance(exc, NotDurableError)
            if failsafe:
                self.metrics.not_durable.inc()
            log.error(
                "result_not_stored",
                **part_fields(ins),
                failsafe_reject_sent=failsafe,
                error=str(exc),
            )
            return None
        commit_ms = (time.perf_counter_ns() - t0) / 1e6
        self._append_ledger(ins)
        return commit_ms

    def _append_ledger(self, ins: Inspection) -> None:
        if self.ledger is None:
            return
        try:
            self.ledger.append(ins.result_id)
        except OSError as exc:
            self.metrics.errors.inc(reason="ledger")
            log.error("ledger_write_failed", camera=ins.camera, seq=ins.seq, error=str(exc))


def part_fields(ins: Inspection) -> dict[str, Any]:
    """How a log event names the part it is about, so that the events of one part join up:
    its camera, sequence number, part id and result id."""
    return {
        "camera": ins.camera,
        "seq": ins.seq,
        "part_id": ins.part_id,
        "result_id": ins.result_id,
    }


def log_result(ins: Inspection) -> None:
    """One event per verdict: passes at debug, fails at info, errors at warning."""
    fields: dict[str, Any] = {
        "station": ins.station,
        **part_fields(ins),
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
