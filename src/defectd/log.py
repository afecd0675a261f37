"""structlog configuration, done once at the edge of the program (the CLI), never at import;
and ``RateLimiter``, the one rule for repeated log events (the daemon's log processor, the
pipeline's frame errors and the cameras' consumer errors all use it)."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, Literal, TextIO, cast

import structlog

LogFormat = Literal["auto", "json", "console"]
LEVELS = ("debug", "info", "warning", "error")


def configure_logging(
    level: str = "info", fmt: LogFormat = "auto", stream: TextIO | None = None
) -> None:
    """Route structlog events to ``stream`` (stderr by default).

    ``auto`` writes a coloured console view on a terminal and JSON lines otherwise
    (journald and log shippers read those). Raises ``ValueError`` on an unknown level.
    """
    if level.lower() not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; choose one of {', '.join(LEVELS)}")
    # Without a stream, every write looks up sys.stderr: while a rich progress bar runs on a
    # terminal it replaces sys.stderr with a proxy that prints log lines above the bar (on
    # the bar's console), so a log line never lands on the bar's line.
    out: TextIO = stream if stream is not None else cast("TextIO", _CurrentStderr())
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: structlog.typing.Processor
    if use_json:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


class _CurrentStderr:
    """A file whose writes go to whatever ``sys.stderr`` is at that moment."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger bound with the module ``name`` as ``logger``.

    The logger stays lazy: modules create theirs at import, before the CLI configures logging,
    and every call must still use the configuration in force (stream, format, level).
    """
    return cast("structlog.typing.FilteringBoundLogger", _LazyLogger(name))


class _LazyLogger:
    """Builds the bound logger on each call, from the configuration in force at that call."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(structlog.get_logger(self._name).bind(logger=self._name), attr)


class RateLimiter:
    """At most ``burst`` events per key in each ``interval_s`` window; the rest are counted.

    ``admit(key)`` returns None for an event to drop, else how many events of that key were
    dropped since the last one admitted (to log as ``suppressed=N``). Thread-safe; ``clock``
    (seconds) is injectable for tests. Keys are bounded by code paths; past ``max_keys`` the
    table is reset rather than grown.
    """

    def __init__(
        self,
        interval_s: float,
        burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
    ) -> None:
        if interval_s <= 0 or burst < 1:
            raise ValueError("rate limit needs interval_s > 0 and burst >= 1")
        self.interval_s = interval_s
        self.burst = burst
        self._clock = clock
        self._max_keys = max_keys
        self._lock = threading.Lock()
        # key -> [window start, events admitted in the window, events dropped since the last]
        self._state: dict[Hashable, list[float]] = {}
        self.suppressed_total = 0

    def admit(self, key: Hashable) -> int | None:
        now = self._clock()
        with self._lock:
            state = self._state.get(key)
            if state is None or now - state[0] >= self.interval_s:
                if state is None and len(self._state) >= self._max_keys:
                    self._state.clear()
                self._state[key] = [now, 1.0, 0.0]
                return int(state[2]) if state is not None else 0
            if state[1] < self.burst:
                state[1] += 1
                suppressed, state[2] = int(state[2]), 0.0
                return suppressed
            state[2] += 1
            self.suppressed_total += 1
            return None
