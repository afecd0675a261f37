"""``FakeClock``: a ``defectd.clock.Clock`` whose time moves only when the code waits.

A wait that would block instead jumps the clock forward, to the wait's deadline or to the next
action scheduled with ``call_at`` (e.g. a frame arriving in a queue), whichever comes first,
and runs that action. So a single-threaded test drives a timing rule (the batcher's
``max_delay_ms``) step by step and reads exact times. Not for code waited on by other threads.
"""

from __future__ import annotations

import heapq
import itertools
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_NS = 1_000_000_000


class FakeClock:
    """Starts at ``start_s``; ``advance``, ``sleep`` and timed-out waits move it forward."""

    def __init__(self, start_s: float = 0.0) -> None:
        self._now_ns = round(start_s * _NS)
        self._timers: list[tuple[int, int, Callable[[], None]]] = []
        self._order = itertools.count()

    def monotonic_ns(self) -> int:
        return self._now_ns

    def monotonic(self) -> float:
        return self._now_ns / _NS

    def call_at(self, t_s: float, action: Callable[[], None]) -> None:
        """Run ``action`` when the clock reaches ``t_s`` (at once if it already has)."""
        heapq.heappush(self._timers, (round(t_s * _NS), next(self._order), action))
        self._run_due()

    def advance(self, seconds: float) -> None:
        """Move forward by ``seconds``, running the actions due on the way, in time order."""
        self._advance_to(self._now_ns + round(seconds * _NS))

    def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        deadline = None if timeout is None else self._now_ns + round(timeout * _NS)
        while not event.is_set() and self._step_towards(deadline):
            pass
        return event.is_set()

    def get(self, q: queue.Queue[T], timeout: float) -> T:
        deadline = self._now_ns + round(max(0.0, timeout) * _NS)
        while True:
            try:
                return q.get_nowait()
            except queue.Empty:
                if not self._step_towards(deadline):
                    raise

    def _step_towards(self, deadline: int | None) -> bool:
        """Jump to the next action (run it) or to ``deadline``; False once at the deadline
        (or, without one, when nothing is scheduled: the wait would never end)."""
        target = self._timers[0][0] if self._timers else None
        if deadline is not None and (target is None or target > deadline):
            if self._now_ns >= deadline:
                return False
            target = deadline
        if target is None:
            return False
        self._advance_to(max(target, self._now_ns))
        return True

    def _advance_to(self, t_ns: int) -> None:
        while self._timers and self._timers[0][0] <= t_ns:
            when, _, action = heapq.heappop(self._timers)
            self._now_ns = max(self._now_ns, when)
            action()
        self._now_ns = max(self._now_ns, t_ns)

    def _run_due(self) -> None:
        self._advance_to(self._now_ns)
