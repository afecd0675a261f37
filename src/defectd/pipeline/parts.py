"""Part identity on the line: triggers from the PLC, pairing them with frames, gate deadlines.

A PLC acts on parts at a reject gate, not on frames. This module holds the pure pieces of that
contract (no threads, no network, clocks passed in), used by the daemon's line wiring and by
``defectd plc-sim``:

- ``LineConfig``: how one camera learns which part it sees (``[cameras.line]`` in the station
  config): ``free-run`` (no part identity from the line, as before), ``plc-trigger`` (each
  trigger fires the camera's software trigger and the next frame is that part) or
  ``hw-counter`` (the camera is hardware-triggered; the PLC announces each part with the
  camera's frame counter).
- ``parse_trigger``: the ``<prefix>/<station>/<camera>/trigger`` payload -> ``PartTicket``.
- ``TriggerPairer`` and ``CounterPairer``: which frame belongs to which part, and which parts
  got no frame in time (they get the verdict ``error:no_frame``).
- ``gate_deadline_for``, ``time_to_gate_s``, ``expiry_interval_s``: the gate deadline of a
  verdict and the MQTT 5 message expiry it is published with.
- ``synthetic_part_defective``: the truth of a simulated part, shared by the synthetic camera
  and the simulated PLC.

Times: ``*_ns`` are ``time.monotonic_ns()`` (intervals), ``*_wall`` and deadlines are
``time.time()`` epoch seconds (the PLC and the daemon agree on wall time, e.g. through NTP;
a PLC that cannot gives ``gate_ms`` and the daemon converts it on receipt).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from defectd.errors import DefectdError

LineMode = Literal["free-run", "plc-trigger", "hw-counter"]

# Part ids travel in topics' payloads and logs: printable, bounded.
_PART_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
_MAX_CORRELATION_BYTES = 256
# Part ids remembered to recognise a trigger the PLC sent twice (QoS 1 re-delivery).
_RECENT_IDS = 4096


class TriggerError(DefectdError):
    """A trigger message that cannot be used; the message names the field at fault."""


class LineConfig(BaseModel):
    """``[cameras.line]``: part identity and gate deadline of one camera.

    ``gate_ms`` is the deadline of a part measured from its grab when its trigger gave none (and
    of every part in ``free-run`` mode); ``None`` = no deadline (results wait for the broker
    without bound, as an offline station wants). ``frame_timeout_ms`` bounds trigger -> frame
    (``plc-trigger``) and announcement <-> frame (``hw-counter``); a part without a frame by
    then gets ``error:no_frame``. ``max_pending`` bounds the parts waiting for a frame: when
    more arrive, the oldest gets ``error:no_frame`` at once.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: LineMode = "free-run"
    gate_ms: float | None = Field(default=None, gt=0, le=3_600_000)
    frame_timeout_ms: float = Field(default=500.0, gt=0, le=60_000)
    max_pending: int = Field(default=64, ge=1, le=100_000)


@dataclass(frozen=True, slots=True)
class PartTicket:
    """One part announced by the line.

    ``gate_deadline`` is epoch seconds (``None``: the camera's ``gate_ms`` after grab applies).
    ``correlation_data`` and ``response_topic`` are the trigger's MQTT 5 properties, echoed
    with the part's verdict. ``counter`` is the camera frame counter (``hw-counter`` mode).
    """

    camera: str
    part_id: str
    gate_deadline: float | None = None
    recipe: str | None = None
    counter: int | None = None
    correlation_data: bytes | None = None
    response_topic: str | None = None
    t_received_wall: float = 0.0
    t_received_ns: int = 0
    fired_ns: int | None = None  # when the software trigger was fired for it

    @property
    def correlation_hex(self) -> str | None:
        return None if self.correlation_data is None else self.correlation_data.hex()


def parse_trigger(
    payload: bytes | str,
    *,
    camera: str,
    now_wall: float,
    now_ns: int,
    correlation_data: bytes | None = None,
    response_topic: str | None = None,
) -> PartTicket:
    """Read one trigger message (``trigger.schema.json``) into a ``PartTicket``.

    The payload is a JSON object: ``part_id`` (required), at most one of ``gate_deadline``
    (absolute, epoch seconds) and ``gate_ms`` (milliseconds from receipt), optional ``recipe``
    and ``counter``. Raises ``TriggerError`` naming the field at fault.
    """
    try:
        data: Any = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TriggerError(f"trigger for camera {camera!r}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise TriggerError(f"trigger for camera {camera!r}: expected a JSON object")
    part_id = data.get("part_id")
    if not isinstance(part_id, str) or not _PART_ID.match(part_id):
        raise TriggerError(
            f"trigger for camera {camera!r}: part_id: expected 1-128 printable ASCII "
            f"characters without spaces, got {part_id!r}"
        )
    if "gate_deadline" in data and "gate_ms" in data:
        raise TriggerError(
            f"trigger {part_id!r}: give gate_deadline (epoch s) or gate_ms (from now), not both"
        )
    deadline: float | None = None
    if "gate_deadline" in data:
        deadline = _number(data["gate_deadline"], "gate_deadline", part_id)
        if deadline < 1e9:
            raise TriggerError(
                f"trigger {part_id!r}: gate_deadline: expected epoch seconds (UTC), got "
                f"{deadline!r}; relative deadlines go in gate_ms"
            )
    elif "gate_ms" in data:
        ms = _number(data["gate_ms"], "gate_ms", part_id)
        if ms <= 0:
            raise TriggerError(f"trigger {part_id!r}: gate_ms: must be > 0, got {ms!r}")
        deadline = now_wall + ms / 1000.0
    recipe = data.get("recipe")
    if recipe is not None and not isinstance(recipe, str):
        raise TriggerError(f"trigger {part_id!r}: recipe: expected a string, got {recipe!r}")
    counter = data.get("counter")
    if counter is not None and (
        not isinstance(counter, int) or isinstance(counter, bool) or counter < 0
    ):
        raise TriggerError(f"trigger {part_id!r}: counter: expected an integer >= 0")
    if correlation_data is not None and len(correlation_data) > _MAX_CORRELATION_BYTES:
        raise TriggerError(
            f"trigger {part_id!r}: correlation data longer than {_MAX_CORRELATION_BYTES} bytes"
        )
    if response_topic is not None and (
        not response_topic or any(c in response_topic for c in "#+\x00")
    ):
        raise TriggerError(
            f"trigger {part_id!r}: response topic {response_topic!r} is not a topic name"
        )
    return PartTicket(
        camera=camera,
        part_id=part_id,
        gate_deadline=deadline,
        recipe=recipe,
        counter=counter,
        correlation_data=correlation_data,
        response_topic=response_topic or None,
        t_received_wall=now_wall,
        t_received_ns=now_ns,
    )


def _number(value: Any, key: str, part_id: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TriggerError(f"trigger {part_id!r}: {key}: expected a number, got {value!r}")
    return float(value)


# --- gate deadlines ---------------------------------------------------------------------------


def gate_deadline_for(
    ticket: PartTicket | None, t_grab_wall: float, gate_ms: float | None
) -> float | None:
    """The gate deadline (epoch s) of a part: its trigger's, else ``gate_ms`` after grab."""
    if ticket is not None and ticket.gate_deadline is not None:
        return ticket.gate_deadline
    if gate_ms is None:
        return None
    return t_grab_wall + gate_ms / 1000.0


def time_to_gate_s(gate_deadline: float | None, now_wall: float) -> float | None:
    """Seconds left until the gate (negative once it has passed); ``None`` without a gate."""
    return None if gate_deadline is None else gate_deadline - now_wall


def expiry_interval_s(gate_deadline: float | None, now_wall: float) -> int | None:
    """The MQTT 5 message expiry for a verdict published now: the time left to the gate,
    rounded up to whole seconds (the protocol's unit). ``None``: no gate, or the gate has
    passed (the verdict is late and goes to the ``late`` topic without expiry)."""
    left = time_to_gate_s(gate_deadline, now_wall)
    if left is None or left <= 0:
        return None
    return max(1, math.ceil(left))


def is_late(gate_deadline: float | None, now_wall: float) -> bool:
    """Whether a verdict handed to the broker now misses its gate."""
    left = time_to_gate_s(gate_deadline, now_wall)
    return left is not None and left <= 0


# --- pairing ----------------------------------------------------------------------------------


@dataclass(slots=True)
class PairingCounts:
    """What a pairer has seen since it was made (plain counters, read by metrics)."""

    announced: int = 0  # tickets accepted
    duplicates: int = 0  # tickets whose part id was already seen (ignored)
    paired: int = 0
    no_frame: int = 0  # tickets that got no frame in time (or were pushed out)
    unpaired_frames: int = 0  # frames no ticket claimed

    def as_dict(self) -> dict[str, int]:
        return {
            "announced": self.announced,
            "duplicates": self.duplicates,
            "paired": self.paired,
            "no_frame": self.no_frame,
            "unpaired_frames": self.unpaired_frames,
        }


class _RecentIds:
    """The last ``n`` part ids (bounded), to drop a trigger delivered twice."""

    def __init__(self, n: int = _RECENT_IDS) -> None:
        self._order: deque[str] = deque()
        self._ids: set[str] = set()
        self._n = n

    def seen(self, part_id: str) -> bool:
        """True when ``part_id`` was seen before; remembers it otherwise."""
        if part_id in self._ids:
            return True
        self._ids.add(part_id)
        self._order.append(part_id)
        if len(self._order) > self._n:
            self._ids.discard(self._order.popleft())
        return False


class TriggerPairer:
    """``plc-trigger`` mode: each accepted trigger fires the camera once; frames pair with the
    waiting triggers oldest first, one trigger in flight at a time.

    Not thread-safe: its owner serialises calls. ``offer`` accepts a ticket (``None`` for a
    duplicate; a list of tickets pushed out by ``max_pending``); the owner fires the camera
    for ``to_fire()`` and calls ``fired``; ``claim`` pairs a frame grabbed at ``t_grab_ns``
    with the oldest waiting ticket fired before that grab (a frame with no such ticket is an
    unpaired frame: a stale buffer or a trigger nobody asked for); ``expire`` returns the
    tickets whose frame did not come within ``frame_timeout_ms`` of the fire.
    """

    def __init__(self, config: LineConfig) -> None:
        self._timeout_ns = round(config.frame_timeout_ms * 1e6)
        self._max_pending = config.max_pending
        self._pending: deque[PartTicket] = deque()
        self._recent = _RecentIds()
        self.counts = PairingCounts()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def offer(self, ticket: PartTicket) -> list[PartTicket] | None:
        """Queue ``ticket``; ``None`` when its part id was seen before (a duplicate, ignored),
        else the tickets pushed out to keep at most ``max_pending`` waiting (no frame)."""
        if self._recent.seen(ticket.part_id):
            self.counts.duplicates += 1
            return None
        self.counts.announced += 1
        self._pending.append(ticket)
        pushed: list[PartTicket] = []
        while len(self._pending) > self._max_pending:
            pushed.append(self._pending.popleft())
        self.counts.no_frame += len(pushed)
        return pushed

    def to_fire(self) -> PartTicket | None:
        """The ticket to trigger the camera for now: the oldest waiting one, and only while no
        fired ticket still waits for its frame (one trigger in flight, so that a frame can
        belong to one part only)."""
        if not self._pending:
            return None
        first = self._pending[0]
        return first if first.fired_ns is None else None

    def fired(self, part_id: str, fired_ns: int) -> None:
        """Record when the camera was triggered for ``part_id`` (its frame cannot be older)."""
        for i, t in enumerate(self._pending):
            if t.part_id == part_id:
                self._pending[i] = replace(t, fired_ns=fired_ns)
                return

    def claim(self, t_grab_ns: int) -> PartTicket | None:
        """The ticket of a frame grabbed at ``t_grab_ns``, or ``None`` (unpaired frame)."""
        if self._pending:
            first = self._pending[0]
            if first.fired_ns is not None and first.fired_ns <= t_grab_ns:
                self._pending.popleft()
                self.counts.paired += 1
                return first
        self.counts.unpaired_frames += 1
        return None

    def expire(self, now_ns: int, now_wall: float | None = None) -> list[PartTicket]:
        """Tickets given up: the fired one whose frame did not come within ``frame_timeout_ms``
        of the fire, and waiting ones whose gate deadline passed before the camera could be
        fired for them (``now_wall``: epoch s)."""
        out: list[PartTicket] = []
        while self._pending:
            t = self._pending[0]
            if t.fired_ns is not None:
                if now_ns - t.fired_ns < self._timeout_ns:
                    break
            elif now_wall is None or t.gate_deadline is None or t.gate_deadline > now_wall:
                break
            out.append(self._pending.popleft())
        self.counts.no_frame += len(out)
        return out

    def drain(self) -> list[PartTicket]:
        """Every waiting ticket (at stop: they get ``error:no_frame``)."""
        out = list(self._pending)
        self._pending.clear()
        self.counts.no_frame += len(out)
        return out


F = TypeVar("F")


@dataclass(slots=True)
class _Waiting(Generic[F]):
    item: F
    since_ns: int


@dataclass(slots=True)
class CounterExpired(Generic[F]):
    """What ``CounterPairer.expire`` gave up on: announcements without their frame (they get
    ``error:no_frame``) and frames without their announcement (events, not inspected)."""

    tickets: list[PartTicket] = field(default_factory=list)
    frames: list[F] = field(default_factory=list)


class CounterPairer(Generic[F]):
    """``hw-counter`` mode: the PLC announces each part with the camera's frame counter; a
    frame pairs with the announcement that names its counter, in whichever order they arrive.

    Frames are opaque (``F``; the daemon passes ``Frame``s). Each side waits up to
    ``frame_timeout_ms`` for the other; ``expire`` returns what is left over. A frame lost on
    the way (a gap in the counter) leaves its announcement unpaired: that part gets
    ``error:no_frame`` and the next frame still pairs by its own counter. Not thread-safe.
    """

    def __init__(self, config: LineConfig) -> None:
        self._timeout_ns = round(config.frame_timeout_ms * 1e6)
        self._max_pending = config.max_pending
        self._tickets: OrderedDict[int, _Waiting[PartTicket]] = OrderedDict()
        self._frames: OrderedDict[int, _Waiting[F]] = OrderedDict()
        self._recent = _RecentIds()
        self.counts = PairingCounts()
        self.unpaired_announcements = 0

    def announce(
        self, ticket: PartTicket, now_ns: int
    ) -> tuple[tuple[PartTicket, F] | None, CounterExpired[F]]:
        """Accept an announcement (``ticket.counter`` set); returns the pair when its frame is
        already waiting, and what was pushed out by ``max_pending``. Raises ``TriggerError``
        without a counter. A duplicate part id (or counter already announced) is ignored."""
        if ticket.counter is None:
            raise TriggerError(
                f"trigger {ticket.part_id!r}: counter: required for camera "
                f"{ticket.camera!r} (line mode hw-counter)"
            )
        pushed: CounterExpired[F] = CounterExpired()
        if ticket.counter in self._tickets or self._recent.seen(ticket.part_id):
            self.counts.duplicates += 1
            return None, pushed
        self.counts.announced += 1
        frame = self._frames.pop(ticket.counter, None)
        if frame is not None:
            self.counts.paired += 1
            return (ticket, frame.item), pushed
        self._tickets[ticket.counter] = _Waiting(ticket, now_ns)
        while len(self._tickets) > self._max_pending:
            pushed.tickets.append(self._tickets.popitem(last=False)[1].item)
        self._count_expired(pushed)
        return None, pushed

    def frame(
        self, counter: int, item: F, now_ns: int
    ) -> tuple[tuple[PartTicket, F] | None, CounterExpired[F]]:
        """Offer a frame with its device counter; the pair when its announcement is waiting."""
        pushed: CounterExpired[F] = CounterExpired()
        waiting = self._tickets.pop(counter, None)
        if waiting is not None:
            self.counts.paired += 1
            return (waiting.item, item), pushed
        old = self._frames.pop(counter, None)
        if old is not None:  # the same counter twice (wrapped): the older one is unpaired
            pushed.frames.append(old.item)
        self._frames[counter] = _Waiting(item, now_ns)
        while len(self._frames) > self._max_pending:
            pushed.frames.append(self._frames.popitem(last=False)[1].item)
        self._count_expired(pushed)
        return None, pushed

    def expire(self, now_ns: int) -> CounterExpired[F]:
        """Announcements and frames that waited ``frame_timeout_ms`` for their other half."""
        out: CounterExpired[F] = CounterExpired()
        while self._tickets:
            counter, ticket = next(iter(self._tickets.items()))
            if now_ns - ticket.since_ns < self._timeout_ns:
                break
            del self._tickets[counter]
            out.tickets.append(ticket.item)
        while self._frames:
            counter, frame = next(iter(self._frames.items()))
            if now_ns - frame.since_ns < self._timeout_ns:
                break
            del self._frames[counter]
            out.frames.append(frame.item)
        self._count_expired(out)
        return out

    def drain(self) -> CounterExpired[F]:
        """Everything still waiting (at stop)."""
        out: CounterExpired[F] = CounterExpired(
            [w.item for w in self._tickets.values()], [w.item for w in self._frames.values()]
        )
        self._tickets.clear()
        self._frames.clear()
        self._count_expired(out)
        return out

    def _count_expired(self, out: CounterExpired[F]) -> None:
        self.counts.no_frame += len(out.tickets)
        self.unpaired_announcements += len(out.tickets)
        self.counts.unpaired_frames += len(out.frames)


# --- the simulated line's truth ----------------------------------------------------------------


def synthetic_part_key(seed: int, part_id: str) -> int:
    """A 64-bit key of a simulated part: its renderer seed and its truth draw derive from it."""
    digest = hashlib.blake2b(f"{seed}:{part_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def synthetic_part_defective(seed: int, part_id: str, defect_rate: float) -> bool:
    """Whether the simulated part ``part_id`` of a line with ``seed`` carries defects.

    The synthetic camera (triggered mode) renders exactly this truth, and ``defectd plc-sim``
    computes it without rendering, so both sides agree on every part.
    """
    return (synthetic_part_key(seed, part_id) >> 11) / float(1 << 53) < defect_rate
