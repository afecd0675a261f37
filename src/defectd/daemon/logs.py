"""Logging helpers for the long-running service: rate limiting of repeated warnings and errors.

A camera that drops out or an engine that fails can produce the same warning hundreds of times
a second; journald would then rotate away everything useful. ``RateLimit`` is a structlog
processor: per key (logger, event, camera, reason) at most ``burst`` events per ``interval_s``
pass; the rest are dropped and counted, and the next event that passes carries
``suppressed=N``. Only warnings and errors are limited: verdicts (info/debug) always pass.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

LIMITED_METHODS = frozenset({"warning", "warn", "error", "exception", "critical", "fatal"})
_KEY_FIELDS = ("logger", "event", "camera", "reason", "kind")


class RateLimit:
    """A structlog processor; thread-safe; ``clock`` is injectable for tests."""

    def __init__(
        self,
        interval_s: float = 10.0,
        burst: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0 or burst < 1:
            raise ValueError("rate limit needs interval_s > 0 and burst >= 1")
        self.interval_s = interval_s
        self.burst = burst
        self._clock = clock
        self._lock = threading.Lock()
        # key -> [window start, events passed in window, events suppressed since last pass]
        self._state: dict[tuple[Any, ...], list[float]] = {}
        self.suppressed_total = 0

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if method_name not in LIMITED_METHODS:
            return event_dict
        key = tuple(str(event_dict.get(k, "")) for k in _KEY_FIELDS)
        now = self._clock()
        with self._lock:
            state = self._state.get(key)
            if state is None or now - state[0] >= self.interval_s:
                suppressed = int(state[2]) if state is not None else 0
                self._state[key] = [now, 1.0, 0.0]
                if len(self._state) > 10_000:  # keys are bounded by code paths; be safe anyway
                    self._state = {key: self._state[key]}
            elif state[1] < self.burst:
                state[1] += 1
                suppressed, state[2] = int(state[2]), 0.0
            else:
                state[2] += 1
                self.suppressed_total += 1
                raise structlog.DropEvent
        if suppressed:
            event_dict["suppressed"] = suppressed
        return event_dict


def install_rate_limit(limit: RateLimit) -> None:
    """Put ``limit`` first in the configured processor chain (once; a second call replaces it).

    Called by the daemon at start, after the CLI configured logging.
    """
    processors = [p for p in structlog.get_config()["processors"] if not isinstance(p, RateLimit)]
    structlog.configure(processors=[limit, *processors])
