"""``defectd plc-sim``: the reject gate's rule and the six outcomes of a part."""

from __future__ import annotations

import pytest

from defectd.publish.plcsim import Outcome, PlcSimReport, gate_passes, judge


@pytest.mark.parametrize(
    ("defective", "verdict", "outcome"),
    [
        (False, "pass", Outcome.CORRECT_PASS),
        (True, "fail", Outcome.CORRECT_REJECT),
        (True, "pass", Outcome.MODEL_ESCAPE),
        (False, "fail", Outcome.MODEL_FALSE_REJECT),
        (True, None, Outcome.SYSTEM_REJECT),
        (False, None, Outcome.SYSTEM_REJECT),
        (True, "error", Outcome.SYSTEM_REJECT),
        (False, "error", Outcome.SYSTEM_REJECT),
    ],
)
def test_each_part_ends_in_one_of_six_outcomes(
    defective: bool, verdict: str | None, outcome: Outcome
) -> None:
    assert judge(defective, verdict) is outcome


def test_only_a_pass_verdict_in_time_opens_the_gate() -> None:
    assert gate_passes("pass")
    assert not any(gate_passes(v) for v in ("fail", "error", None, "PASS", ""))


def test_a_pass_for_a_frame_of_another_part_is_a_system_escape_when_defective() -> None:
    assert judge(True, "pass", mispaired=True) is Outcome.SYSTEM_ESCAPE
    assert judge(False, "fail", mispaired=True) is Outcome.SYSTEM_REJECT


def test_the_report_ends_with_the_summary_line() -> None:
    report = PlcSimReport(
        parts=3, outcomes={o.value: 0 for o in Outcome} | {"correct_pass": 3},
        triggers_not_sent=0, verdicts=3, in_time=3, no_verdict_in_time=0, late_topic=0,
        duplicates=0, unpaired=0, mispaired=0, daemon_events={}, gate_ms=500.0,
        latency_ms_p50=10.0, latency_ms_p99=20.0, latency_ms_max=21.0, duration_s=1.0,
    )  # fmt: skip
    assert report.last_line() == "system_escapes=0 unpaired=0 parts=3"
    assert "correct_pass" in report.table() and "p99 20.0 ms" in report.table()
