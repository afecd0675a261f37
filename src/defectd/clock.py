"""Time as a part that is passed in: ``Clock`` and the real one, ``SYSTEM_CLOCK``.

The pipeline, its batcher, the publisher and the service read the time and wait through a
``Clock`` they are given, so tests can hand in ``defectd.testing.clock.FakeClock``, whose time
moves only when the code under test waits, and check timing rules exactly instead of within
wide tolerances. Every wait that has a timeout goes through the clock: ``sleep``, ``wait``
(for an event) and ``get`` (from a queue).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Protocol, TypeVar

T = TypeVar("T")


class Clock(Protocol):
    """Monotonic time and timed waits. Seconds are floats, nanoseconds ints."""

    def monotonic_ns(self) -> int: ...

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        """Wait until ``event`` is set or ``timeout`` passes; whether it is set."""
        ...

    def get(self, q: queue.Queue[T], timeout: float) -> T:
        """The next item of ``q``, waiting at most ``timeout`` (0: do not wait); raises
        ``queue.Empty`` when none came."""
        ...


class SystemClock:
    """The machine's monotonic clock; waits block the calling thread."""

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        return event.wait(timeout)

    def get(self, q: queue.Queue[T], timeout: float) -> T:
        return q.get(timeout=timeout) if timeout > 0 else q.get_nowait()


SYSTEM_CLOCK: Clock = SystemClock()
