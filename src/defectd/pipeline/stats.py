"""Counters and latency windows of the pipeline, read by ``stats()`` and the metrics endpoint."""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

STAGES = (
    "intake",  # grab -> submit (time the source held the frame)
    "queue",  # submit -> preprocessing starts
    "preprocess",
    "batch_wait",  # preprocessed -> first batch holding its tiles starts inference
    "infer",  # first batch start -> last batch end (several batches for a tiled frame)
    "post_wait",  # inferred -> a post-processing thread picks it up
    "postprocess",
    "total",  # grab -> verdict handed to the sink
)


class LatencyWindow:
    """The last ``size`` frames' stage latencies (ms) and completion times, thread-safe."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._lat = np.zeros((size, len(STAGES)), np.float64)
        self._done = np.zeros(size, np.float64)  # completion times, monotonic seconds
        self._count = 0
        self._lock = threading.Lock()

    def record(self, latencies_ms: dict[str, float], t_done_s: float) -> None:
        row = [latencies_ms.get(s, np.nan) for s in STAGES]
        with self._lock:
            i = self._count % self._size
            self._lat[i] = row
            self._done[i] = t_done_s
            self._count += 1

    def percentiles(self) -> dict[str, dict[str, float]]:
        """Per stage: p50, p90, p99 and max over the window (inspected frames only)."""
        with self._lock:
            n = min(self._count, self._size)
            lat = self._lat[:n].copy()
        out: dict[str, dict[str, float]] = {}
        for j, stage in enumerate(STAGES):
            col = lat[:, j]
            col = col[~np.isnan(col)]
            if col.size == 0:
                continue
            p50, p90, p99 = np.percentile(col, [50, 90, 99])
            out[stage] = {
                "p50": round(float(p50), 3),
                "p90": round(float(p90), 3),
                "p99": round(float(p99), 3),
                "max": round(float(col.max()), 3),
            }
        return out

    def fps(self, now_s: float, horizon_s: float = 10.0) -> float:
        """Verdicts per second over the last ``horizon_s`` (or since the first in the window)."""
        with self._lock:
            n = min(self._count, self._size)
            done = self._done[:n].copy()
        recent = done[done >= now_s - horizon_s]
        if recent.size < 2:
            return 0.0
        span = now_s - float(recent.min())
        return float(recent.size / span) if span > 0 else 0.0


@dataclass(slots=True)
class Counters:
    """Monotonic counts since start; mutated under the pipeline's lock."""

    submitted: int = 0
    completed: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    cameras: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    batches: int = 0
    tiles: int = 0
    sink_errors: int = 0
    swaps: int = 0


@dataclass(frozen=True, slots=True)
class PipelineStats:
    """A snapshot for the metrics endpoint and benchmarks.

    ``verdicts``: pass/fail/error counts; ``errors``: error verdicts by reason code;
    ``cameras``: verdict counts per camera; ``queues``/``queue_capacity``: depths in frames;
    ``latency_ms``: per stage p50/p90/p99/max over the last ``stats_window`` frames.
    """

    running: bool
    submitted: int
    completed: int
    in_flight: int
    verdicts: dict[str, int]
    errors: dict[str, int]
    cameras: dict[str, dict[str, int]]
    queues: dict[str, int]
    queue_capacity: dict[str, int]
    batches: int
    tiles: int
    mean_batch: float
    fps: float
    latency_ms: dict[str, dict[str, float]]
    sink_errors: int
    swaps: int
    model: str
    model_sha256: str
    engine: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
