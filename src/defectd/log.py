"""structlog configuration, done once at the edge of the program (the CLI), never at import."""

from __future__ import annotations

import logging
import sys
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
    out = stream if stream is not None else sys.stderr
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
