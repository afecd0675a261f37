"""Service logging: JSON on a stream, levels honoured, repeated warnings rate-limited."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import structlog

from defectd.daemon.logs import RateLimit, install_rate_limit
from defectd.log import configure_logging, get_logger


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    saved = structlog.get_config()
    yield out
    structlog.configure(**saved)


def _events(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_logger_created_before_configuration_follows_it(stream: io.StringIO) -> None:
    log = get_logger("early")  # modules create loggers at import, before the CLI configures
    configure_logging("warning", "json", stream)
    log.info("filtered_out")
    log.warning("kept", camera="cam0")
    (event,) = _events(stream)
    assert event["event"] == "kept" and event["logger"] == "early" and event["camera"] == "cam0"


def test_repeated_warning_is_limited_and_the_next_one_says_how_many(stream: io.StringIO) -> None:
    now = [0.0]
    configure_logging("info", "json", stream)
    install_rate_limit(RateLimit(interval_s=10, burst=2, clock=lambda: now[0]))
    log = get_logger("t")
    for _ in range(5):
        log.warning("engine_error", reason="nan")
    now[0] = 11.0
    log.warning("engine_error", reason="nan")
    events = _events(stream)
    assert len(events) == 3
    assert events[2]["suppressed"] == 3


def test_different_reasons_and_info_events_are_not_limited(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream)
    install_rate_limit(RateLimit(interval_s=60, burst=1))
    log = get_logger("t")
    for reason in ("a", "b"):
        log.warning("engine_error", reason=reason)
    for seq in range(3):
        log.info("inspection", verdict="fail", seq=seq)
    assert len(_events(stream)) == 5


def test_install_twice_keeps_one_limiter(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream)
    install_rate_limit(RateLimit())
    install_rate_limit(RateLimit())
    assert sum(isinstance(p, RateLimit) for p in structlog.get_config()["processors"]) == 1
