"""The plain data the OPC UA server shows, and how it crosses from the pipeline to the server.

Nothing here imports asyncua. The pipeline's threads hand each verdict to ``VerdictQueue.put``
(never blocks: a full queue counts the verdict as dropped); the server thread takes them in
batches (``take``). ``RecentRing`` keeps the last verdicts of a camera as parallel arrays, the
form a PLC reads in one request.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from defectd.pipeline.inspection import Inspection, Verdict

# Verdict codes for PLCs (an integer compares in one instruction; strings do not).
VERDICT_CODES: dict[str, int] = {"none": 0, "pass": 1, "fail": 2, "error": 3}


@dataclass(frozen=True, slots=True)
class VerdictRecord:
    """One verdict as OPC UA shows it.

    ``sequence`` counts the station's verdicts from 1 (per server start), so a client sees a
    gap; times are epoch seconds; ``defects_json`` is a compact list of
    ``{area_px, area_mm2, bbox, score}``; ``late`` is true when the verdict reached the server
    after the part's gate deadline (never act on it).
    """

    sequence: int
    station: str
    camera: str
    part_id: str
    result_id: str
    verdict: str
    rule: str
    reason: str
    defects: int
    defects_json: str
    model_name: str
    model_sha256: str
    t_grab: float
    t_verdict: float
    gate_deadline: float | None
    late: bool
    latency_ms: float

    @property
    def verdict_code(self) -> int:
        return VERDICT_CODES.get(self.verdict, 0)


def record_from(ins: Inspection, *, sequence: int, now_wall: float) -> VerdictRecord:
    """A ``VerdictRecord`` of ``ins`` given at ``now_wall`` (epoch s)."""
    defects = [
        {
            "area_px": d.area_px,
            "area_mm2": None if d.area_mm2 is None else round(d.area_mm2, 4),
            "bbox": list(d.bbox),
            "score": round(d.score_max, 4),
        }
        for d in ins.defects
    ]
    late = ins.gate_deadline is not None and now_wall > ins.gate_deadline
    return VerdictRecord(
        sequence=sequence,
        station=ins.station,
        camera=ins.camera,
        part_id=ins.part_id or "",
        result_id=ins.result_id,
        verdict=ins.verdict.value,
        rule=ins.rule or ("none" if ins.verdict is Verdict.PASS else ""),
        reason=ins.reason or "",
        defects=len(ins.defects),
        defects_json=json.dumps(defects, separators=(",", ":")),
        model_name=ins.model_name,
        model_sha256=ins.model_sha256,
        t_grab=ins.t_grab_wall,
        t_verdict=now_wall,
        gate_deadline=ins.gate_deadline,
        late=late,
        latency_ms=float(ins.latencies_ms.get("total", 0.0)),
    )


@dataclass(frozen=True, slots=True)
class StationState:
    """What the daemon tells the server about the station (refreshed on its ticks).

    ``status``: ``starting`` | ``online`` | ``stopping`` | ``offline``; ``live``, ``ready``
    and ``health`` are ``/healthz``'s answer (``health``: its reasons in words, ``ok`` when
    ready).
    """

    status: str = "starting"
    live: bool = False
    ready: bool = False
    health: str = ""
    model_name: str = ""
    model_sha256: str = ""
    engine: str = ""
    config_hash: str = ""
    outbox_depth: int = 0
    broker_connected: bool = False


@dataclass(frozen=True, slots=True)
class OpcUaStats:
    """Counters of the server: verdicts queued, emitted as events, dropped (queue full),
    waiting now, sessions refused, triggers accepted and refused."""

    queued: int
    events: int
    dropped: int
    waiting: int
    refused_sessions: int
    triggers: int
    bad_triggers: int
    running: bool


class VerdictQueue:
    """Bounded hand-over of verdicts from pipeline threads to the server thread.

    ``put`` never blocks: when ``maxsize`` verdicts already wait it drops the new one and
    counts it (``dropped``). ``on_first`` is called (outside the lock) when a put makes the
    queue non-empty, so the server loop is woken once per batch, not per verdict.
    """

    def __init__(self, maxsize: int, on_first: Callable[[], None] | None = None) -> None:
        self._items: deque[VerdictRecord] = deque()
        self._maxsize = maxsize
        self._lock = threading.Lock()
        self._on_first = on_first
        self._sequence = 0
        self.dropped = 0
        self.accepted = 0

    def set_waker(self, on_first: Callable[[], None] | None) -> None:
        self._on_first = on_first

    def put(self, ins: Inspection, now_wall: float) -> bool:
        """Queue ``ins``; False (and counted) when the queue is full."""
        with self._lock:
            self._sequence += 1
            if len(self._items) >= self._maxsize:
                self.dropped += 1
                return False
            self._items.append(record_from(ins, sequence=self._sequence, now_wall=now_wall))
            self.accepted += 1
            first = len(self._items) == 1
            wake = self._on_first
        if first and wake is not None:
            wake()
        return True

    def take(self) -> list[VerdictRecord]:
        """Every waiting verdict, oldest first (empties the queue)."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
        return items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def last_sequence(self) -> int:
        with self._lock:
            return self._sequence


@dataclass(slots=True)
class RecentRing:
    """The last ``size`` verdicts of one camera, newest first, as parallel arrays.

    A PLC that was away reads ``Sequences`` and takes the entries newer than the last sequence
    it handled; one that finds the oldest entry newer than that knows it missed verdicts.
    """

    size: int
    _items: deque[VerdictRecord] = field(default_factory=deque)

    def add(self, record: VerdictRecord) -> None:
        self._items.appendleft(record)
        while len(self._items) > self.size:
            self._items.pop()

    def arrays(self) -> dict[str, list[int] | list[str]]:
        items = list(self._items)
        pad = self.size - len(items)
        return {
            "Sequences": [r.sequence for r in items] + [0] * pad,
            "PartIds": [r.part_id for r in items] + [""] * pad,
            "VerdictCodes": [r.verdict_code for r in items] + [0] * pad,
            "Verdicts": [r.verdict for r in items] + [""] * pad,
            "ResultIds": [r.result_id for r in items] + [""] * pad,
        }
