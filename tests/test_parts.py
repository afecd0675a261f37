"""Part identity on the line: trigger messages, pairing triggers and counters with frames,
gate deadlines and the MQTT 5 expiry they give (``defectd.pipeline.parts``)."""

from __future__ import annotations

import json

import pytest

from defectd.pipeline.inspection import Inspection, Verdict
from defectd.pipeline.parts import (
    CounterPairer,
    LineConfig,
    PartTicket,
    TriggerError,
    TriggerPairer,
    expiry_interval_s,
    gate_deadline_for,
    is_late,
    parse_trigger,
    synthetic_part_defective,
)
from defectd.publish import messages as m

NOW = 1_764_650_000.0
MS = 1_000_000  # ns


def ticket(part_id: str, *, counter: int | None = None, received_ns: int = 0) -> PartTicket:
    return PartTicket(camera="cam", part_id=part_id, counter=counter, t_received_ns=received_ns)


def parse(payload: object, **kw: object) -> PartTicket:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return parse_trigger(text, camera="cam", now_wall=NOW, now_ns=0, **kw)  # type: ignore[arg-type]


# --- trigger messages --------------------------------------------------------------------------


def test_trigger_with_an_absolute_gate_deadline_keeps_it() -> None:
    t = parse({"part_id": "P-1", "gate_deadline": NOW + 0.4, "recipe": "r7"})
    assert (t.part_id, t.gate_deadline, t.recipe) == ("P-1", NOW + 0.4, "r7")


def test_trigger_with_gate_ms_counts_from_receipt() -> None:
    assert parse({"part_id": "P-1", "gate_ms": 250}).gate_deadline == pytest.approx(NOW + 0.25)


def test_trigger_keeps_mqtt5_correlation_data_and_response_topic() -> None:
    t = parse({"part_id": "P-1"}, correlation_data=b"\x01\xff", response_topic="plc/answers")
    assert (t.correlation_hex, t.response_topic, t.gate_deadline) == ("01ff", "plc/answers", None)


@pytest.mark.parametrize(
    ("payload", "names"),
    [
        ("not json", "not JSON"),
        ([1, 2], "JSON object"),
        ({"gate_ms": 5}, "part_id"),
        ({"part_id": "has space"}, "part_id"),
        ({"part_id": "P", "gate_deadline": NOW, "gate_ms": 5}, "not both"),
        ({"part_id": "P", "gate_deadline": 400}, "gate_deadline: expected epoch seconds"),
        ({"part_id": "P", "gate_ms": -1}, "gate_ms"),
        ({"part_id": "P", "gate_ms": "soon"}, "gate_ms: expected a number"),
        ({"part_id": "P", "counter": -3}, "counter"),
        ({"part_id": "P", "recipe": 5}, "recipe"),
    ],
)
def test_a_bad_trigger_is_refused_naming_the_field(payload: object, names: str) -> None:
    with pytest.raises(TriggerError, match=names):
        parse(payload)


def test_trigger_schema_accepts_what_parse_trigger_accepts_and_refuses_the_rest() -> None:
    good = [
        {"part_id": "P-1"},
        {"part_id": "P-1", "gate_deadline": NOW + 1, "recipe": "r"},
        {"part_id": "P-1", "gate_ms": 300, "counter": 17, "schema_version": 1, "kind": "trigger"},
    ]
    for payload in good:
        parse(payload)
        assert m.schema_errors("trigger", payload) == []
    bad = [{"gate_ms": 5}, {"part_id": "P", "gate_deadline": NOW, "gate_ms": 5}]
    for payload in bad:
        assert m.schema_errors("trigger", payload)


# --- gate deadlines and expiry -----------------------------------------------------------------


def test_gate_deadline_comes_from_the_trigger_else_gate_ms_after_grab() -> None:
    with_gate = PartTicket(camera="cam", part_id="P", gate_deadline=NOW + 2)
    assert gate_deadline_for(with_gate, NOW, 500.0) == NOW + 2
    assert gate_deadline_for(ticket("P"), NOW, 500.0) == pytest.approx(NOW + 0.5)
    assert gate_deadline_for(None, NOW, 500.0) == pytest.approx(NOW + 0.5)
    assert gate_deadline_for(None, NOW, None) is None


def test_expiry_is_the_time_left_to_the_gate_rounded_up_to_seconds() -> None:
    assert expiry_interval_s(NOW + 2.2, NOW) == 3
    assert expiry_interval_s(NOW + 0.05, NOW) == 1
    assert expiry_interval_s(NOW + 5.0, NOW + 1.0) == 4
    assert expiry_interval_s(None, NOW) is None  # no gate: no expiry
    assert expiry_interval_s(NOW - 0.01, NOW) is None  # late: no expiry, late topic


def test_a_verdict_is_late_once_its_gate_has_passed() -> None:
    assert not is_late(NOW + 0.001, NOW)
    assert is_late(NOW, NOW)
    assert not is_late(None, NOW)


# --- plc-trigger pairing -----------------------------------------------------------------------


def test_triggers_pair_with_frames_one_in_flight_in_order() -> None:
    p = TriggerPairer(LineConfig(mode="plc-trigger"))
    assert p.offer(ticket("A")) == [] and p.offer(ticket("B")) == []
    first = p.to_fire()
    assert first is not None and first.part_id == "A"
    p.fired("A", 10 * MS)
    assert p.to_fire() is None  # B waits until A's frame is in
    assert p.claim(12 * MS) is not None
    nxt = p.to_fire()
    assert nxt is not None and nxt.part_id == "B"
    p.fired("B", 20 * MS)
    got = p.claim(25 * MS)
    assert got is not None and got.part_id == "B"
    assert p.counts.as_dict() == {
        "announced": 2, "duplicates": 0, "paired": 2, "no_frame": 0, "unpaired_frames": 0,
    }  # fmt: skip


def test_trigger_without_a_frame_expires_as_no_frame_and_the_next_part_still_pairs() -> None:
    p = TriggerPairer(LineConfig(mode="plc-trigger", frame_timeout_ms=100))
    p.offer(ticket("A"))
    p.offer(ticket("B"))
    p.fired("A", 0)
    assert p.expire(99 * MS) == []
    expired = p.expire(100 * MS)
    assert [t.part_id for t in expired] == ["A"]
    p.fired("B", 101 * MS)
    got = p.claim(105 * MS)
    assert got is not None and got.part_id == "B"
    assert p.counts.no_frame == 1 and p.counts.paired == 1


def test_a_frame_grabbed_before_the_trigger_fired_is_stale_and_unpaired() -> None:
    p = TriggerPairer(LineConfig(mode="plc-trigger"))
    p.offer(ticket("A"))
    assert p.claim(5 * MS) is None  # not fired yet: a frame nobody asked for
    p.fired("A", 10 * MS)
    assert p.claim(9 * MS) is None  # grabbed before the fire: a stale buffer
    got = p.claim(11 * MS)
    assert got is not None and got.part_id == "A"
    assert p.counts.unpaired_frames == 2


def test_a_trigger_sent_twice_is_a_duplicate_and_ignored() -> None:
    p = TriggerPairer(LineConfig(mode="plc-trigger"))
    assert p.offer(ticket("A")) == []
    assert p.offer(ticket("A")) is None
    assert p.pending == 1 and p.counts.duplicates == 1


def test_more_waiting_triggers_than_max_pending_push_the_oldest_out() -> None:
    p = TriggerPairer(LineConfig(mode="plc-trigger", max_pending=2))
    p.offer(ticket("A"))
    p.offer(ticket("B"))
    pushed = p.offer(ticket("C"))
    assert pushed is not None and [t.part_id for t in pushed] == ["A"]
    assert [t.part_id for t in p.drain()] == ["B", "C"]
    assert p.counts.no_frame == 3


# --- hw-counter pairing ------------------------------------------------------------------------


def test_counter_pairing_survives_a_dropped_frame() -> None:
    p: CounterPairer[str] = CounterPairer(LineConfig(mode="hw-counter", frame_timeout_ms=50))
    pairs: list[tuple[str, str]] = []
    for n in range(5):
        got, _ = p.announce(ticket(f"P{n}", counter=100 + n), n * MS)
        assert got is None
    for n in (0, 1, 3, 4):  # the frame with counter 102 never arrives
        got, _ = p.frame(100 + n, f"frame{100 + n}", (n + 1) * MS)
        assert got is not None
        pairs.append((got[0].part_id, got[1]))
    assert pairs == [("P0", "frame100"), ("P1", "frame101"), ("P3", "frame103"),
                     ("P4", "frame104")]  # fmt: skip
    left = p.expire(60 * MS)
    assert [t.part_id for t in left.tickets] == ["P2"]  # -> error:no_frame
    assert left.frames == []
    assert p.unpaired_announcements == 1 and p.counts.no_frame == 1


def test_a_frame_may_arrive_before_its_announcement() -> None:
    p: CounterPairer[str] = CounterPairer(LineConfig(mode="hw-counter"))
    got, _ = p.frame(7, "frame7", 0)
    assert got is None
    got, _ = p.announce(ticket("P7", counter=7), MS)
    assert got is not None and (got[0].part_id, got[1]) == ("P7", "frame7")


def test_a_frame_no_announcement_claims_is_an_unpaired_frame() -> None:
    p: CounterPairer[str] = CounterPairer(LineConfig(mode="hw-counter", frame_timeout_ms=10))
    p.frame(3, "frame3", 0)
    left = p.expire(10 * MS)
    assert left.frames == ["frame3"] and left.tickets == []
    assert p.counts.unpaired_frames == 1


def test_an_announcement_without_a_counter_is_refused_in_counter_mode() -> None:
    p: CounterPairer[str] = CounterPairer(LineConfig(mode="hw-counter"))
    with pytest.raises(TriggerError, match="counter: required"):
        p.announce(ticket("P"), 0)


# --- messages carry the line fields ------------------------------------------------------------


def inspection(verdict: Verdict, **kw: object) -> Inspection:
    fields: dict[str, object] = {
        "station": "s1", "camera": "cam", "seq": 4, "verdict": verdict, "part_id": "P-9",
        "t_grab_wall": NOW, "gate_deadline": NOW + 0.5, "correlation": "00ab",
    }  # fmt: skip
    fields.update(kw)
    return Inspection(**fields)  # type: ignore[arg-type]


def test_result_and_reject_echo_part_gate_and_correlation_and_validate() -> None:
    ins = inspection(Verdict.FAIL, rule="any-defect")
    result = m.result_message(ins, NOW + 0.1)
    reject = m.reject_message(ins, NOW + 0.1)
    for kind, msg in (("result", result), ("reject", reject)):
        assert m.schema_errors(kind, msg) == []
        assert msg["part_id"] == "P-9" and msg["correlation"] == "00ab"
        assert msg["gate_deadline"]["epoch"] == NOW + 0.5 and msg["late"] is False


def test_a_late_result_is_marked_late_and_still_valid() -> None:
    payload = m.mark_late(m.encode(m.result_message(inspection(Verdict.PASS), NOW)))
    msg = json.loads(payload)
    assert msg["late"] is True and m.schema_errors("result", msg) == []


def test_a_no_frame_verdict_has_seq_minus_one_and_validates() -> None:
    ins = inspection(Verdict.ERROR, seq=-1, rule="error:no_frame", reason="no_frame: none")
    assert m.schema_errors("result", m.result_message(ins, NOW)) == []
    assert m.schema_errors("reject", m.reject_message(ins, NOW)) == []


def test_a_part_without_a_gate_has_a_null_deadline() -> None:
    msg = m.result_message(inspection(Verdict.PASS, gate_deadline=None, correlation=None), NOW)
    assert msg["gate_deadline"] is None and m.schema_errors("result", msg) == []


def test_topics_for_triggers_and_late_verdicts() -> None:
    topics = m.Topics("defectd", "s1")
    assert topics.trigger("cam") == "defectd/s1/cam/trigger"
    assert topics.late("cam") == "defectd/s1/cam/late"


# --- the simulated line's truth ----------------------------------------------------------------


def test_synthetic_truth_is_a_pure_function_at_the_configured_rate() -> None:
    truths = [synthetic_part_defective(7, f"P-{n}", 0.3) for n in range(4000)]
    assert truths == [synthetic_part_defective(7, f"P-{n}", 0.3) for n in range(4000)]
    assert 0.27 < sum(truths) / len(truths) < 0.33
    assert not any(synthetic_part_defective(7, f"P-{n}", 0.0) for n in range(100))
    assert all(synthetic_part_defective(7, f"P-{n}", 1.0) for n in range(100))


def test_a_waiting_trigger_whose_gate_passed_before_its_fire_gets_no_frame() -> None:
    p = TriggerPairer(LineConfig(mode="plc-trigger", frame_timeout_ms=100))
    p.offer(PartTicket(camera="cam", part_id="A", gate_deadline=NOW + 1))
    assert p.expire(10_000 * MS, NOW + 0.5) == []  # not fired, gate still ahead: keep it
    assert [t.part_id for t in p.expire(10_000 * MS, NOW + 1)] == ["A"]
