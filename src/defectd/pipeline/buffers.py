"""Reusable arrays for the hot path: per-thread scratch space and a shared pool.

Frames of one camera have one size, so after the first frame every stage finds its buffers
ready and the steady state allocates nothing large per frame.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

import numpy as np
from numpy.typing import DTypeLike, NDArray


class Scratch:
    """Named arrays owned by one thread, reallocated only when the shape or dtype changes."""

    def __init__(self) -> None:
        self._arrays: dict[str, NDArray[Any]] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: DTypeLike) -> NDArray[Any]:
        """An uninitialised array ``name`` of ``shape`` and ``dtype`` (the same one each time)."""
        arr = self._arrays.get(name)
        if arr is None or arr.shape != shape or arr.dtype != np.dtype(dtype):
            arr = np.empty(shape, dtype)
            self._arrays[name] = arr
        return arr


class BufferPool:
    """Arrays handed between threads: ``take`` one, ``give`` it back when done with it.

    Keeps at most ``max_free`` idle arrays per shape; ``take`` allocates when none is free, so
    the number of live arrays is bounded by the work in flight (bounded queues), not here.
    """

    def __init__(self, dtype: DTypeLike = np.float32, max_free: int = 8) -> None:
        self._dtype = np.dtype(dtype)
        self._max_free = max_free
        self._free: defaultdict[tuple[int, ...], list[NDArray[Any]]] = defaultdict(list)
        self._lock = threading.Lock()
        self.allocated = 0

    def take(self, shape: tuple[int, ...]) -> NDArray[Any]:
        with self._lock:
            free = self._free[shape]
            if free:
                return free.pop()
            self.allocated += 1
        return np.empty(shape, self._dtype)

    def give(self, arr: NDArray[Any]) -> None:
        with self._lock:
            free = self._free[arr.shape]
            if len(free) < self._max_free:
                free.append(arr)
