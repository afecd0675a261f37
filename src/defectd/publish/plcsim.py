"""``defectd plc-sim``: a reference simulated PLC and conveyor for the line contract.

Parts leave the infeed at ``rate_hz``. For each part the PLC publishes a trigger
(``<prefix>/<station>/<camera>/trigger``, QoS 1, ``part_id``, absolute ``gate_deadline`` =
trigger time + ``gate_ms``, MQTT 5 correlation data) and listens for verdicts on the camera's
``result`` topic. At the reject gate it lets a part pass **only** when a ``pass`` verdict for
that very part id arrived before the gate deadline (not marked ``late``); everything else —
fail, error, no verdict, a verdict after the gate — is rejected. That is the rule integrators
implement (docs/plc.md); this module is its executable reference.

The conveyor's truth comes from the synthetic line (``pipeline.parts.synthetic_part_defective``
with the station camera's ``seed`` and ``defect_rate``), so each part ends in one of six
outcomes (``judge``): correct pass, correct reject, model escape (a defective part with a pass
verdict for its own image), model false reject, system reject (no usable verdict in time, or an
``error`` verdict: rejected by default) and system escape (a defective part passed for a reason
other than the model's pass verdict on its own image — the gate rule makes it impossible; the
daemon's ``part_mispaired`` events would be the way it shows).

Times are wall-clock epoch seconds (``time.time()``), as on a PLC with NTP; the PLC and the
daemon share the host here.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from defectd.log import get_logger
from defectd.pipeline.parts import synthetic_part_defective
from defectd.publish.connection import on_connection, properties
from defectd.publish.messages import Topics

log = get_logger(__name__)


class Outcome(StrEnum):
    CORRECT_PASS = "correct_pass"
    CORRECT_REJECT = "correct_reject"
    MODEL_ESCAPE = "model_escape"
    MODEL_FALSE_REJECT = "model_false_reject"
    SYSTEM_REJECT = "system_reject"
    SYSTEM_ESCAPE = "system_escape"


def gate_passes(verdict: str | None) -> bool:
    """The reject gate's rule: a part passes only on a ``pass`` verdict received in time."""
    return verdict == "pass"


def judge(defective: bool, verdict: str | None, *, mispaired: bool = False) -> Outcome:
    """The outcome of one part at the gate.

    ``verdict`` is the verdict for this part received before its gate deadline (``None``: none
    in time). ``mispaired``: the daemon reported that the frame judged for this part showed
    another part, so the verdict says nothing about this one.
    """
    if gate_passes(verdict):
        if mispaired:
            return Outcome.SYSTEM_ESCAPE if defective else Outcome.CORRECT_PASS
        return Outcome.MODEL_ESCAPE if defective else Outcome.CORRECT_PASS
    if verdict != "fail" or mispaired:
        return Outcome.SYSTEM_REJECT
    return Outcome.CORRECT_REJECT if defective else Outcome.MODEL_FALSE_REJECT


# Without the truth of each part (a real camera) the model outcomes merge into what the gate did.
_WITHOUT_TRUTH = {
    Outcome.CORRECT_PASS: "passed_on_pass",
    Outcome.MODEL_ESCAPE: "passed_on_pass",
    Outcome.CORRECT_REJECT: "rejected_on_fail",
    Outcome.MODEL_FALSE_REJECT: "rejected_on_fail",
}


def _outcome_keys(truth: bool) -> list[str]:
    if truth:
        return [o.value for o in Outcome]
    return ["passed_on_pass", "rejected_on_fail", Outcome.SYSTEM_REJECT, Outcome.SYSTEM_ESCAPE]


@dataclass(frozen=True, slots=True)
class PlcSimConfig:
    """What the simulated line does; ``seed``/``defect_rate`` must match the station's
    synthetic camera (``truth = False`` for a real camera: outcomes then say nothing about
    the model, only about the system)."""

    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = "defectd"
    station: str = "demo"
    camera: str = "line1"
    rate_hz: float = 20.0
    parts: int = 1000
    gate_ms: float = 1000.0
    seed: int = 0
    defect_rate: float = 0.3
    truth: bool = True
    run_id: str = ""
    client_id: str = "defectd-plc-sim"
    settle_s: float = 2.0  # after the last gate, wait this long for stragglers (late topic)


@dataclass(slots=True)
class _Part:
    index: int
    part_id: str
    defective: bool
    t_trigger: float = 0.0
    deadline: float = 0.0
    sent: bool = False
    verdict: str | None = None  # first verdict received in time
    t_verdict: float | None = None  # receipt of the first verdict, in time or not
    result_ids: set[str] = field(default_factory=set)
    late: int = 0


@dataclass(frozen=True, slots=True)
class PlcSimReport:
    """The counts of a run. ``latency_ms_*``: trigger published -> first verdict received
    (every part that got one); ``in_time``: verdicts received before their gate."""

    parts: int
    outcomes: dict[str, int]
    triggers_not_sent: int
    verdicts: int
    in_time: int
    no_verdict_in_time: int
    late_topic: int
    duplicates: int
    unpaired: int
    mispaired: int
    daemon_events: dict[str, int]
    gate_ms: float
    latency_ms_p50: float | None
    latency_ms_p99: float | None
    latency_ms_max: float | None
    duration_s: float
    # System rejects per 10 s of the run (by trigger time): where the faults hit.
    system_rejects_per_10s: tuple[int, ...] = ()

    @property
    def system_escapes(self) -> int:
        return self.outcomes.get(Outcome.SYSTEM_ESCAPE.value, 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "parts": self.parts,
            "outcomes": self.outcomes,
            "triggers_not_sent": self.triggers_not_sent,
            "verdicts": self.verdicts,
            "in_time": self.in_time,
            "no_verdict_in_time": self.no_verdict_in_time,
            "late_topic": self.late_topic,
            "duplicates": self.duplicates,
            "unpaired": self.unpaired,
            "mispaired": self.mispaired,
            "daemon_events": self.daemon_events,
            "gate_ms": self.gate_ms,
            "latency_ms_p50": self.latency_ms_p50,
            "latency_ms_p99": self.latency_ms_p99,
            "latency_ms_max": self.latency_ms_max,
            "duration_s": self.duration_s,
            "system_rejects_per_10s": list(self.system_rejects_per_10s),
            "system_escapes": self.system_escapes,
        }

    def table(self) -> str:
        """The six outcomes and the timing, as aligned text lines."""
        lines = [f"{'outcome':<20}{'parts':>8}{'share':>9}"]
        for key, n in self.outcomes.items():
            lines.append(f"{key:<20}{n:>8}{n / max(self.parts, 1):>9.2%}")
        lat = (
            "n/a"
            if self.latency_ms_p50 is None
            else f"p50 {self.latency_ms_p50:.1f} ms, p99 {self.latency_ms_p99:.1f} ms, "
            f"max {self.latency_ms_max:.1f} ms"
        )
        lines.append(f"trigger -> verdict received: {lat} (gate {self.gate_ms:g} ms)")
        lines.append(
            f"in time {self.in_time}, none in time {self.no_verdict_in_time}, late topic "
            f"{self.late_topic}, triggers not sent {self.triggers_not_sent}, "
            f"duplicates {self.duplicates}"
        )
        return "\n".join(lines)

    def last_line(self) -> str:
        return f"system_escapes={self.system_escapes} unpaired={self.unpaired} parts={self.parts}"


class PlcSim:
    """Runs the conveyor and the gate against a broker; ``run()`` returns the report.

    ``on_progress`` (optional) is called about once a second with the parts triggered so far.
    ``stop()`` ends the infeed early (the parts already on the belt still reach the gate).
    """

    def __init__(
        self,
        config: PlcSimConfig,
        *,
        on_progress: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._clock = clock
        self._on_progress = on_progress
        self._topics = Topics(config.prefix, config.station)
        self._lock = threading.Lock()
        self._parts: dict[str, _Part] = {}
        self._unknown = 0
        self._late_topic = 0
        self._events: Counter[str] = Counter()
        self._mispaired: set[str] = set()
        self._stop = threading.Event()
        self.connected = threading.Event()
        run = config.run_id or f"{int(self._clock()):x}"
        self._prefix_id = f"{run}-"

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> PlcSimReport:
        cfg = self.config
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=True,
        )
        client.reconnect_delay_set(1, 2)
        on_connection(client, self._on_connect, self._on_disconnect)
        client.on_message = self._on_message
        props = properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        client.connect_async(cfg.host, cfg.port, keepalive=5, clean_start=False, properties=props)
        client.loop_start()
        t_start = self._clock()
        try:
            if not self.connected.wait(30):
                log.error("plc_sim_no_broker", host=cfg.host, port=cfg.port)
            self._infeed(client)
            last_gate = max((p.deadline for p in self._parts.values()), default=self._clock())
            self._stop.wait(max(0.0, last_gate - self._clock()) + cfg.settle_s)
        finally:
            client.disconnect()
            client.loop_stop()
        return self._report(self._clock() - t_start)

    # --- the conveyor ---------------------------------------------------------------------

    def _infeed(self, client: mqtt.Client) -> None:
        cfg = self.config
        period = 1.0 / cfg.rate_hz
        topic = self._topics.trigger(cfg.camera)
        t0 = self._clock()
        next_progress = t0 + 1.0
        for i in range(cfg.parts):
            due = t0 + i * period
            if self._stop.wait(max(0.0, due - self._clock())):
                return
            part_id = f"{self._prefix_id}{i:06d}"
            defective = cfg.truth and synthetic_part_defective(cfg.seed, part_id, cfg.defect_rate)
            now = self._clock()
            part = _Part(i, part_id, defective, t_trigger=now, deadline=now + cfg.gate_ms / 1000)
            with self._lock:
                self._parts[part_id] = part
            if client.is_connected():
                props = properties(PacketTypes.PUBLISH)
                props.CorrelationData = i.to_bytes(4, "big")
                payload = json.dumps({"part_id": part_id, "gate_deadline": part.deadline})
                info = client.publish(topic, payload, qos=1, properties=props)
                part.sent = info.rc == mqtt.MQTT_ERR_SUCCESS
            if self._on_progress is not None and now >= next_progress:
                next_progress = now + 1.0
                self._on_progress(i + 1)

    # --- what comes back ------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, reason_code: ReasonCode, session: bool) -> None:
        if reason_code.is_failure:
            log.error("plc_sim_refused", reason=str(reason_code))
            return
        cfg = self.config
        client.subscribe(
            [
                (self._topics.result(cfg.camera), 1),
                (self._topics.late(cfg.camera), 1),
                (self._topics.events, 1),
            ]
        )
        self.connected.set()

    def _on_disconnect(self, reason_code: ReasonCode) -> None:
        self.connected.clear()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        t = self._clock()
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            return
        if msg.topic == self._topics.events:
            event = str(payload.get("event"))
            data = payload.get("data") or {}
            with self._lock:
                self._events[event] += int(data.get("count", 1) or 1)
                if event == "part_mispaired" and data.get("part_id"):
                    self._mispaired.add(str(data["part_id"]))
            return
        late_topic = msg.topic == self._topics.late(self.config.camera)
        with self._lock:
            if late_topic:
                self._late_topic += 1
            part = self._parts.get(str(payload.get("part_id")))
            if part is None:
                self._unknown += 1
                return
            result_id = str(payload.get("result_id"))
            first = not part.result_ids
            part.result_ids.add(result_id)
            if first:
                part.t_verdict = t
            if late_topic or payload.get("late"):
                part.late += 1
                return
            if part.verdict is None and t <= part.deadline:
                part.verdict = str(payload.get("verdict"))

    def _report(self, duration_s: float) -> PlcSimReport:
        with self._lock:
            parts = list(self._parts.values())
            events = dict(self._events)
            mispaired = set(self._mispaired)
            unknown = self._unknown
            late_topic = self._late_topic
        judged = [
            (p, judge(p.defective, p.verdict, mispaired=p.part_id in mispaired)) for p in parts
        ]
        outcomes = Counter(o.value for _, o in judged)
        if not self.config.truth:
            # A real camera: nobody knows which parts were defective, only what the gate did.
            outcomes = Counter(_WITHOUT_TRUTH.get(o, o.value) for _, o in judged)
        t0 = min((p.t_trigger for p in parts), default=0.0)
        buckets = [0] * (1 + int((max((p.t_trigger for p in parts), default=t0) - t0) // 10))
        for p, o in judged:
            if o is Outcome.SYSTEM_REJECT:
                buckets[int((p.t_trigger - t0) // 10)] += 1
        latencies = sorted(
            (p.t_verdict - p.t_trigger) * 1000.0 for p in parts if p.t_verdict is not None
        )
        p50 = statistics.median(latencies) if latencies else None
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None
        unpaired = (
            unknown + events.get("unpaired_frames", 0) + events.get("unpaired_announcements", 0)
        )
        return PlcSimReport(
            parts=len(parts),
            outcomes={k: outcomes.get(k, 0) for k in _outcome_keys(self.config.truth)},
            triggers_not_sent=sum(not p.sent for p in parts),
            verdicts=sum(p.t_verdict is not None for p in parts),
            in_time=sum(p.verdict is not None for p in parts),
            no_verdict_in_time=sum(p.verdict is None for p in parts),
            late_topic=late_topic,
            duplicates=sum(max(0, len(p.result_ids) - 1) for p in parts),
            unpaired=unpaired,
            mispaired=len(mispaired),
            daemon_events=events,
            gate_ms=self.config.gate_ms,
            latency_ms_p50=p50,
            latency_ms_p99=p99,
            latency_ms_max=latencies[-1] if latencies else None,
            duration_s=round(duration_s, 3),
            system_rejects_per_10s=tuple(buckets),
        )
