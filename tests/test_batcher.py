"""The dynamic batcher's timing rules, driven by a fake clock: exact times, no tolerances.

Jobs are real preprocessed frames for a real ONNX model (the brightness model of the pipeline
tests); the clock moves only while the batcher waits for the next job.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import pytest

from defectd.model.card import ModelCard
from defectd.pipeline.batcher import POLL_S, Batcher
from defectd.pipeline.buffers import BufferPool
from defectd.pipeline.cameras import DEFAULT_SETUP
from defectd.pipeline.config import PipelineConfig
from defectd.pipeline.job import Job, ModelSlot
from defectd.pipeline.preprocess import Preprocessor
from defectd.testing.clock import FakeClock
from pipeline_support import OrtTestEngine, brightness_model, dark_frame

MS = 1_000_000


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelCard]:
    path = tmp_path_factory.mktemp("batcher") / "model.onnx"
    return path, brightness_model(path, size=64)


class Line:
    """A batcher over a real job queue; ``job(seq, frame_hw)`` makes a preprocessed job."""

    def __init__(
        self,
        model: tuple[Path, ModelCard],
        max_batch: int,
        max_delay_ms: float,
        *,
        wait_for_more: bool = True,
    ):
        path, card = model
        self.clock = FakeClock()
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.slot = ModelSlot(OrtTestEngine(path, card), card, 0)
        self.pre = Preprocessor(card, PipelineConfig(), BufferPool())
        self.batcher = Batcher(
            self.jobs,
            max_batch,
            max_delay_ms / 1e3,
            lambda job: True,
            self.clock,
            wait_for_more=wait_for_more,
        )

    def job(self, seq: int, hw: tuple[int, int] = (64, 64)) -> Job:
        frame = dark_frame(*hw, seq=seq, t_host_ns=self.clock.monotonic_ns())
        job = Job(frame, DEFAULT_SETUP, self.clock.monotonic_ns(), None, slot=self.slot)
        job.prepared = self.pre(frame, DEFAULT_SETUP)
        job.n_tiles = job.prepared.geometry.plan.count
        return job

    def arrive_at(self, t_ms: float, seq: int) -> None:
        self.clock.call_at(t_ms / 1e3, lambda: self.jobs.put(self.job(seq)))


def test_a_lone_tile_leaves_exactly_when_max_delay_has_passed(model) -> None:
    line = Line(model, max_batch=8, max_delay_ms=30)
    line.jobs.put(line.job(0))
    batch = line.batcher.next_batch(threading.Event())
    assert batch is not None and len(batch.entries) == 1
    assert batch.t_first_ns == 0
    assert line.clock.monotonic_ns() == 30 * MS


def test_with_parallel_requests_a_batch_leaves_as_soon_as_nothing_more_is_queued(model) -> None:
    line = Line(model, max_batch=8, max_delay_ms=30, wait_for_more=False)
    line.jobs.put(line.job(0))
    line.jobs.put(line.job(1))
    line.arrive_at(5, 2)  # would join within max_delay; the free request does not wait for it
    batch = line.batcher.next_batch(threading.Event())
    assert batch is not None and [job.frame.seq for job, _ in batch.entries] == [0, 1]
    assert line.clock.monotonic_ns() == 0


def test_each_caller_gets_its_own_batch_buffer(model) -> None:
    from defectd.pipeline.buffers import Scratch

    line = Line(model, max_batch=1, max_delay_ms=0, wait_for_more=False)
    line.jobs.put(line.job(0))
    line.jobs.put(line.job(1))
    first = line.batcher.next_batch(threading.Event(), Scratch())
    second = line.batcher.next_batch(threading.Event(), Scratch())
    assert first is not None and second is not None
    assert first.data.ctypes.data != second.data.ctypes.data


def test_a_full_batch_leaves_at_once(model) -> None:
    line = Line(model, max_batch=4, max_delay_ms=30)
    for seq in range(6):
        line.jobs.put(line.job(seq))
    batch = line.batcher.next_batch(threading.Event())
    assert batch is not None and [job.frame.seq for job, _ in batch.entries] == [0, 1, 2, 3]
    assert line.clock.monotonic_ns() == 0
    assert line.jobs.qsize() == 2


def test_tiles_arriving_within_max_delay_join_the_batch_and_later_ones_wait(model) -> None:
    line = Line(model, max_batch=8, max_delay_ms=20)
    line.arrive_at(5, 0)  # opens the batch at 5 ms: it is due at 25 ms
    line.arrive_at(12, 1)
    line.arrive_at(24, 2)
    line.arrive_at(26, 3)  # after the batch left
    first = line.batcher.next_batch(threading.Event())
    assert first is not None and [job.frame.seq for job, _ in first.entries] == [0, 1, 2]
    assert first.t_first_ns == 5 * MS
    assert line.clock.monotonic_ns() == 25 * MS
    second = line.batcher.next_batch(threading.Event())
    assert second is not None and [job.frame.seq for job, _ in second.entries] == [3]
    assert (second.t_first_ns, line.clock.monotonic_ns()) == (26 * MS, 46 * MS)


def test_the_tiles_of_a_large_frame_fill_several_batches_in_order(model) -> None:
    line = Line(model, max_batch=4, max_delay_ms=20)
    job = line.job(0, hw=(128, 192))
    assert job.n_tiles > 4 and job.n_tiles % 4 != 0
    line.jobs.put(job)
    tiles: list[int] = []
    left_at: list[int] = []
    while len(tiles) < job.n_tiles:
        batch = line.batcher.next_batch(threading.Event())
        assert batch is not None and len(batch.entries) <= 4
        tiles += [tile for _, tile in batch.entries]
        left_at.append(line.clock.monotonic_ns())
    assert tiles == list(range(job.n_tiles))
    assert left_at[:-1] == [0] * (len(left_at) - 1)  # full batches leave at once
    assert left_at[-1] == 20 * MS  # the rest when due


def test_an_idle_batcher_sees_a_stop_within_one_poll(model) -> None:
    line = Line(model, max_batch=4, max_delay_ms=20)
    stop = threading.Event()
    line.clock.call_at(0.2, stop.set)
    assert line.batcher.next_batch(stop) is None
    assert line.clock.monotonic() == pytest.approx(0.2 + POLL_S, abs=POLL_S)
