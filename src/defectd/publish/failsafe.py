"""What the publisher does with a verdict the outbox could not store: the fail-safe path.

A verdict that is not durable must not pass silently. ``failsafe_inspection`` turns it into a
reject (a ``pass`` becomes ``error`` with rule ``error:not_durable``; fail and error stay), and
``failsafe_messages`` builds its result and reject payloads flagged ``not_durable: true``. They
go to the broker directly through ``DirectQueue`` (memory only, bounded, best effort: lost on a
restart or when the broker stays away), so the PLC still sees a reject; the publisher raises
``NotDurableError`` so the daemon counts it, raises the alarm and withholds its watchdog.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

from defectd.errors import PublishError
from defectd.pipeline.inspection import Inspection, Verdict
from defectd.publish import messages as m

NOT_DURABLE_RULE = "error:not_durable"
DIRECT_QUEUE_LIMIT = 10_000


class NotDurableError(PublishError):
    """The verdict could not be stored in the outbox; its fail-safe reject was queued for a
    direct, best-effort publish (``not_durable``)."""


def failsafe_inspection(ins: Inspection, error: str) -> Inspection:
    """The inspection to publish when it cannot be stored: a pass becomes a reject."""
    if ins.verdict is not Verdict.PASS:
        return ins
    return replace(
        ins,
        verdict=Verdict.ERROR,
        rule=NOT_DURABLE_RULE,
        reason=f"not_durable: the pass verdict could not be stored durably ({error})",
    )


def failsafe_messages(
    ins: Inspection, topics: m.Topics, t_published: float
) -> list[tuple[str, bytes]]:
    """``(topic, payload)`` of the result and the reject of a fail-safe inspection, each
    with ``not_durable: true``."""
    result: dict[str, Any] = {**m.result_message(ins, t_published), "not_durable": True}
    reject: dict[str, Any] = {**m.reject_message(ins, t_published), "not_durable": True}
    return [
        (topics.reject, m.encode(reject)),
        (topics.result(ins.camera), m.encode(result)),
    ]


@dataclass(frozen=True, slots=True)
class DirectMessage:
    topic: str
    payload: bytes
    kind: str


class DirectQueue:
    """Messages published without the outbox (thread-safe, bounded: the oldest go first)."""

    def __init__(self, limit: int = DIRECT_QUEUE_LIMIT) -> None:
        self._lock = threading.Lock()
        self._items: deque[DirectMessage] = deque()
        self._limit = limit
        self.queued = 0
        self.dropped = 0

    def put(self, message: DirectMessage) -> None:
        with self._lock:
            if len(self._items) >= self._limit:
                self._items.popleft()
                self.dropped += 1
            self._items.append(message)
            self.queued += 1

    def take(self, n: int) -> list[DirectMessage]:
        with self._lock:
            return [self._items.popleft() for _ in range(min(n, len(self._items)))]

    def __len__(self) -> int:
        return len(self._items)
