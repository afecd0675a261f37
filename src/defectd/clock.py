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


class Deadline:
    """One point in time on a clock that several steps share: each asks ``left()``.

    ``grace_s`` extends it for steps that must run even when the earlier ones used the whole
    time (stop a thread, publish ``offline``): ``step(floor_s)`` is what is left, but at least
    ``floor_s`` while the grace lasts, so the total never passes ``seconds + grace_s``.
    """

    def __init__(self, clock: Clock, seconds: float, grace_s: float = 0.0) -> None:
        self._clock = clock
        self._end = clock.monotonic() + max(0.0, seconds)
        self._hard_end = self._end + max(0.0, grace_s)

    def left(self) -> float:
        return max(0.0, self._end - self._clock.monotonic())

    def step(self, floor_s: float = 0.0, cap_s: float | None = None) -> float:
        """Seconds for the next step: ``left()`` raised to ``floor_s`` within the grace, then
        capped at ``cap_s``."""
        now = self._clock.monotonic()
        t = min(max(self._end - now, floor_s), max(0.0, self._hard_end - now))
        return max(0.0, t if cap_s is None else min(t, cap_s))
