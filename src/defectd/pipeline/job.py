"""The in-flight state of one frame and of the model it is inspected with.

A ``Job`` is created when a frame is submitted and handed from stage to stage through bounded
queues; each field is written by one stage at a time (the queue hand-off orders the writes).
Only ``finished`` is shared between threads and is guarded by the pipeline's lock: it makes
sure every frame gets exactly one verdict.

A job's hold on its model (``ModelSlot``) is a ``SlotHold`` that only moves forward, moved by
the one thread that holds the job: the preprocess thread takes the slot and gives it back if
preprocessing fails; once the job is in the inference queue the inference thread owns it and
gives it back when every tile is inferred or the job is dropped. ``leave_model`` is the only
place a slot is released.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
from numpy.typing import NDArray

from defectd.engines.base import Engine
from defectd.model.card import ModelCard
from defectd.pipeline.cameras import CameraSetup
from defectd.pipeline.frame import Frame
from defectd.pipeline.preprocess import Prepared


class ModelSlot:
    """One engine and its card, with a count of the jobs preprocessed for it.

    After ``swap_engine`` the old slot is retired: jobs already preprocessed for it still run
    on its engine; ``idle`` is set once the last of them has left the engine.
    """

    def __init__(
        self, engine: Engine, card: ModelCard, generation: int, sha256: str | None = None
    ) -> None:
        self.engine = engine
        self.card = card
        self.generation = generation
        # Of the file the engine executes (what verdicts name); default the card's.
        self.sha256 = card.sha256 if sha256 is None else sha256
        self.idle = threading.Event()
        self._pending = 0
        self._retired = False
        self._lock = threading.Lock()
        self._sized: dict[tuple[int, int], Engine] = {}

    def engine_for(self, height: int, width: int) -> Engine:
        """The engine for tiles of ``height`` x ``width``: ``engine`` for its own input size,
        else the same model compiled for that size (``at_size``, made on first use, kept for
        the slot's life; full-frame windows of a fully convolutional model)."""
        spec = self.engine.spec
        if (height, width) == (spec.height, spec.width):
            return self.engine
        with self._lock:
            sized = self._sized.get((height, width))
            if sized is None:
                make = getattr(self.engine, "at_size", None)
                if make is None:
                    raise ValueError(
                        f"engine {self.engine.name} runs {spec.height}x{spec.width} only, "
                        f"not {height}x{width} windows"
                    )
                sized = self._sized[(height, width)] = make(height, width)
            return sized

    def close_sized(self) -> None:
        """Close the engines made by ``engine_for`` (not ``engine``, which the caller owns)."""
        with self._lock:
            sized, self._sized = list(self._sized.values()), {}
        for engine in sized:
            engine.close()

    def acquire(self) -> None:
        with self._lock:
            self._pending += 1

    def release(self) -> None:
        with self._lock:
            self._pending -= 1
            if self._retired and self._pending <= 0:
                self.idle.set()

    def retire(self) -> None:
        with self._lock:
            self._retired = True
            if self._pending <= 0:
                self.idle.set()


class SlotHold(Enum):
    """Where a job stands with its model slot."""

    NONE = "none"  # not preprocessed yet
    HOLDING = "holding"  # preprocessed for ``slot``: its engine must stay open
    INFERRED = "inferred"  # every tile inferred; slot given back
    DROPPED = "dropped"  # failed or refused before all tiles were inferred; slot given back


@dataclass(eq=False, slots=True)
class Job:
    """One submitted frame on its way to a verdict; times are ``time.monotonic_ns()``."""

    frame: Frame
    setup: CameraSetup
    t_submit_ns: int
    deadline_ns: int | None
    slot: ModelSlot | None = None
    prepared: Prepared | None = None
    n_tiles: int = 0
    next_tile: int = 0  # next tile the batcher copies
    tiles_done: int = 0  # tiles inferred
    outputs: list[NDArray[np.float32] | None] = field(default_factory=list)
    t_pre_start_ns: int = 0
    t_pre_end_ns: int = 0
    t_infer_start_ns: int = 0
    t_infer_end_ns: int = 0
    t_post_start_ns: int = 0
    hold: SlotHold = SlotHold.NONE
    data_released: bool = False
    finished: bool = False  # guarded by the pipeline lock

    def expired(self, now_ns: int) -> bool:
        return self.deadline_ns is not None and now_ns > self.deadline_ns

    @property
    def dropped(self) -> bool:
        """Failed or refused on its way through the engine: skip its remaining tiles."""
        return self.hold is SlotHold.DROPPED

    def take_slot(self, slot: ModelSlot) -> None:
        """Hold ``slot`` (already acquired) while the job is on its way through the engine."""
        self.slot = slot
        self.hold = SlotHold.HOLDING

    def leave_model(self, outcome: SlotHold) -> bool:
        """Give the slot back with ``outcome`` (``INFERRED`` or ``DROPPED``); False when the
        job held none (it was already given back, or never taken)."""
        if self.hold is not SlotHold.HOLDING:
            return False
        self.hold = outcome
        assert self.slot is not None
        self.slot.release()
        return True

    def release_data(self) -> None:
        """Give the preprocessed buffer back to its pool (once; batcher thread only)."""
        if self.prepared is not None and not self.data_released:
            self.data_released = True
            self.prepared.release()
