"""Logging helpers for the long-running service: rate limiting of repeated warnings and errors.

A camera that drops out or an engine that fails can produce the same warning hundreds of times
a second; journald would then rotate away everything useful. ``RateLimit`` is a structlog
processor: per key (logger, event, camera, reason) at most ``burst`` events per ``interval_s``
pass; the rest are dropped and counted, and the next event that passes carries
``suppressed=N``. Only warnings and errors are limited: verdicts (info/debug) always pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

from defectd.log import RateLimiter

LIMITED_METHODS = frozenset({"warning", "warn", "error", "exception", "critical", "fatal"})
_KEY_FIELDS = ("logger", "event", "camera", "reason", "kind")


class RateLimit:
    """A structlog processor applying a ``RateLimiter`` per (logger, event, camera, reason,
    kind) to warnings and errors; thread-safe; ``clock`` is injectable for tests."""

    def __init__(
        self,
        interval_s: float = 10.0,
        burst: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limiter = RateLimiter(interval_s, burst, clock)
        self.interval_s = interval_s
        self.burst = burst

    @property
    def suppressed_total(self) -> int:
        return self._limiter.suppressed_total

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if method_name not in LIMITED_METHODS:
            return event_dict
        suppressed = self._limiter.admit(tuple(str(event_dict.get(k, "")) for k in _KEY_FIELDS))
        if suppressed is None:
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
