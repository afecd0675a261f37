"""The dynamic batcher: tiles of frames from all cameras into one engine batch.

A batch leaves when it holds ``max_batch`` tiles or when ``max_delay_s`` has passed since its
first tile, whichever comes first. With ``wait_for_more=False`` (an engine that runs several
requests in parallel, one inference thread each) a batch also leaves as soon as no more tiles
are queued: the thread asking for it has a free request, and a tile arriving a moment later
goes to the next free one, so waiting would leave a core idle and only add latency. Several
inference threads may call ``next_batch``; it serves them one at a time, each with its own
batch buffer (``buffers``). Tiles are copied into a preallocated
``(max_batch, C, H, W)`` float32 buffer per model and calling thread; a batch holds tiles of one
model only (after a hot swap the old model's tiles finish on the old engine). The batcher owns
the cursor into a partly batched frame.

Time comes from the ``Clock`` it is given: the batch's age is read from it, and the waits for
the next job go through it (``clock.get``), so a fake clock drives the ``max_delay`` rule
exactly. A wait lasts until the open batch is due, and ``POLL_S`` at most, so a stop is seen
within that time.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from defectd.clock import SYSTEM_CLOCK, Clock
from defectd.pipeline.buffers import Scratch
from defectd.pipeline.job import Job, ModelSlot

POLL_S = 0.05


@dataclass(slots=True, eq=False)
class Batch:
    """``data`` ``(n_run, C, H, W)`` float32 for ``slot.engine``; ``entries[k] = (job, tile)``
    for the first ``len(entries)`` rows (rows beyond are zero padding up to the engine's
    minimum batch)."""

    slot: ModelSlot
    data: NDArray[np.float32]
    entries: list[tuple[Job, int]]
    t_first_ns: int
    tile_hw: tuple[int, int] = (0, 0)  # (height, width) of the tiles: the engine to run on


class Batcher:
    """Pulls preprocessed jobs from ``jobs`` and forms batches.

    ``admit(job)`` is called for each job taken from the queue and decides whether its tiles
    are batched (False: the job was finished elsewhere, e.g. its deadline passed).
    """

    def __init__(
        self,
        jobs: queue.Queue[Job],
        max_batch: int,
        max_delay_s: float,
        admit: Callable[[Job], bool],
        clock: Clock = SYSTEM_CLOCK,
        *,
        wait_for_more: bool = True,
    ) -> None:
        self._jobs = jobs
        self._wait_for_more = wait_for_more
        self._lock = threading.Lock()
        self._clock = clock
        self._max_batch = max_batch
        self._max_delay_ns = int(max_delay_s * 1e9)
        self._admit = admit
        self._cursor: Job | None = None
        self._buffers = Scratch()

    def _take(self, timeout: float) -> Job | None:
        try:
            job = self._clock.get(self._jobs, timeout)
        except queue.Empty:
            return None
        if not self._admit(job):
            job.release_data()
            return None
        return job

    def next_batch(self, stop: threading.Event, buffers: Scratch | None = None) -> Batch | None:
        """Block until a batch is ready; ``None`` once ``stop`` is set. The batch's data lies
        in ``buffers`` (the caller's, reused by its next call; default the batcher's own)."""
        with self._lock:
            return self._next_batch(stop, buffers if buffers is not None else self._buffers)

    def _next_batch(self, stop: threading.Event, buffers: Scratch) -> Batch | None:
        entries: list[tuple[Job, int]] = []
        slot: ModelSlot | None = None
        buf: NDArray[np.float32] | None = None
        t_first = 0
        limit = self._max_batch
        tile_hw = (0, 0)
        while len(entries) < limit:
            if stop.is_set():
                return None
            job = self._cursor
            if job is not None and (job.dropped or job.finished):
                job.release_data()
                self._cursor = job = None
            if job is None:
                if entries:
                    if not self._wait_for_more and self._jobs.empty():
                        break
                    remaining = (t_first + self._max_delay_ns - self._clock.monotonic_ns()) / 1e9
                    if remaining <= 0 and self._jobs.empty():
                        break
                    job = self._take(min(max(remaining, 0.0), POLL_S))
                    if job is None:
                        if self._clock.monotonic_ns() >= t_first + self._max_delay_ns:
                            break
                        continue
                else:
                    job = self._take(POLL_S)
                    if job is None:
                        continue
                self._cursor = job
            assert job.slot is not None and job.prepared is not None
            plan = job.prepared.geometry.plan
            if slot is None:
                slot = job.slot
                spec = slot.engine.spec
                tile_hw = (plan.tile_h, plan.tile_w)
                if tile_hw == (spec.height, spec.width):
                    limit = max(1, min(self._max_batch, spec.max_batch))
                    n_buf = max(limit, spec.min_batch)
                else:
                    limit = n_buf = 1  # a full-frame window: one at a time (bounded memory)
                shape = (n_buf, spec.channels, *tile_hw)
                buf = buffers.get(f"batch{tile_hw}", shape, np.float32)
                t_first = self._clock.monotonic_ns()
            elif job.slot is not slot or (plan.tile_h, plan.tile_w) != tile_hw:
                break  # the next job is for another model or size: this batch leaves now
            assert buf is not None
            idx = job.next_tile
            np.copyto(buf[len(entries)], job.prepared.geometry.plan.tile(job.prepared.data, idx))
            entries.append((job, idx))
            job.next_tile += 1
            if job.next_tile >= job.n_tiles:
                job.release_data()
                self._cursor = None
        if slot is None or buf is None:
            return None
        n_run = max(len(entries), min(slot.engine.spec.min_batch, buf.shape[0]))
        if n_run > len(entries):
            buf[len(entries) : n_run] = 0.0
        return Batch(slot, buf[:n_run], entries, t_first, tile_hw)
