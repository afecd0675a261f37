"""The durable outbox: commit before return, order, acknowledgement, bounds, exclusivity."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from defectd.errors import PublishError
from defectd.publish import outbox as outbox_module
from defectd.publish.config import OutboxConfig
from defectd.publish.outbox import PRIORITY_DROP_FIRST, PRIORITY_KEEP, Outbox, OutboxMessage


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _outbox(tmp_path: Path, **cfg: object) -> Outbox:
    return Outbox(OutboxConfig(path=tmp_path / "outbox.sqlite", **cfg))  # type: ignore[arg-type]


def test_a_put_survives_sigkill_of_the_process_right_after_it_returns(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    code = textwrap.dedent(
        f"""
        import time
        from defectd.log import configure_logging
        from defectd.publish.config import OutboxConfig
        from defectd.publish.outbox import Outbox
        configure_logging("warning")
        ob = Outbox(OutboxConfig(path={str(path)!r}))
        row = ob.put("p/s/c/result", b'{{"n": 1}}', 1, message_id="abc")
        print(row, flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    row_id = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)

    with _outbox(tmp_path) as ob:
        rows = ob.pending()
    assert [(r.id, r.payload, r.message_id) for r in rows] == [(row_id, b'{"n": 1}', "abc")]


def test_pending_rows_come_oldest_first_after_the_cursor(tmp_path: Path) -> None:
    with _outbox(tmp_path) as ob:
        ids = [ob.put(f"t/{i}", b"x", 1) for i in range(5)]
        assert [r.id for r in ob.pending()] == ids
        assert [r.topic for r in ob.pending(after_id=ids[1], limit=2)] == ["t/2", "t/3"]


def test_ack_removes_only_the_acknowledged_rows(tmp_path: Path) -> None:
    with _outbox(tmp_path) as ob:
        ids = [ob.put("t", b"x", 1) for _ in range(4)]
        assert ob.ack([ids[0], ids[2], 9999]) == 2
        assert [r.id for r in ob.pending()] == [ids[1], ids[3]]
        assert ob.depth == 2
        assert ob.stats().acked == 2


def test_rows_and_depth_survive_a_reopen(tmp_path: Path) -> None:
    with _outbox(tmp_path) as ob:
        for _ in range(3):
            ob.put("t", b"x", 1)
    with _outbox(tmp_path) as ob:
        assert ob.depth == 3
        assert len(ob.pending()) == 3


def test_row_bound_drops_oldest_pass_results_first_and_keeps_rejects(tmp_path: Path) -> None:
    with _outbox(tmp_path, max_rows=10) as ob:
        keep = [ob.put("r", b"x", 1, priority=PRIORITY_KEEP, message_id=f"k{i}") for i in range(3)]
        passes = [ob.put("p", b"x", 1, priority=PRIORITY_DROP_FIRST) for _ in range(7)]
        new = [ob.put("p", b"x", 1) for _ in range(2)]
        remaining = [r.id for r in ob.pending(limit=100)]
        assert remaining == sorted(keep + passes[2:] + new)
        stats = ob.stats()
        assert (stats.depth, stats.dropped, stats.dropped_keep) == (10, 2, 0)


def test_a_dropped_reject_is_logged_with_its_result_id(tmp_path: Path) -> None:
    with _outbox(tmp_path, max_rows=10) as ob, capture_logs() as logs:
        for i in range(11):
            ob.put("r", b"x", 1, priority=PRIORITY_KEEP, kind="reject", message_id=f"id{i}")
        summary = ob.take_drops()
    errors = [e for e in logs if e["event"] == "outbox_dropped_reject"]
    assert [(e["log_level"], e["result_id"]) for e in errors] == [("error", "id0")]
    assert summary is not None
    assert (summary.rows, summary.keep_rows, summary.keep_ids) == (1, 1, ("id0",))
    assert ob.stats().dropped_keep == 1


def test_pass_rows_expire_by_age_and_rejects_do_not(tmp_path: Path) -> None:
    clock = Clock()
    cfg = OutboxConfig(path=tmp_path / "o.sqlite", max_age_s=60.0)
    with Outbox(cfg, clock=clock) as ob:
        old_pass = ob.put("p", b"x", 1)
        old_reject = ob.put("r", b"x", 1, priority=PRIORITY_KEEP)
        clock.t += 61.0
        new_pass = ob.put("p", b"x", 1)
        ob.maintain()
        assert [r.id for r in ob.pending()] == [old_reject, new_pass]
        assert old_pass not in [r.id for r in ob.pending()]
        stats = ob.stats()
        assert (stats.expired, stats.dropped) == (1, 1)


def test_near_bound_is_reported_once_when_crossed(tmp_path: Path) -> None:
    with _outbox(tmp_path, max_rows=10, warn_fraction=0.5) as ob, capture_logs() as logs:
        for _ in range(4):
            ob.put("p", b"x", 1)
        assert ob.check_near_bound() is False
        ob.put("p", b"x", 1)
        assert ob.check_near_bound() is True
        ob.put("p", b"x", 1)
        assert ob.check_near_bound() is False  # still near: not a new crossing
        assert ob.stats().near_bound is True
    warnings = [e for e in logs if e["event"] == "outbox_near_bound"]
    assert len(warnings) == 1
    assert warnings[0]["depth"] == 5


def test_a_second_owner_of_the_same_file_is_refused(tmp_path: Path) -> None:
    with _outbox(tmp_path), pytest.raises(PublishError, match=r"in use by another process"):
        _outbox(tmp_path)


def test_put_after_close_is_an_error(tmp_path: Path) -> None:
    ob = _outbox(tmp_path)
    ob.close()
    with pytest.raises(PublishError, match="closed"):
        ob.put("t", b"x", 1)


def test_a_reader_that_keeps_up_is_served_the_rows_the_file_holds(tmp_path: Path) -> None:
    with _outbox(tmp_path) as ob:
        ids = ob.put_many(
            [OutboxMessage(f"t/{i}", f"{i}".encode(), 1, False, PRIORITY_KEEP, "result",
                           f"m{i}", note=("gate", i)) for i in range(3)]
        )  # fmt: skip
        served = ob.pending()
        # What the writer noted rides along on rows served from memory, never on rows read
        # back from the file; everything else is the stored row.
        assert [r.note for r in served] == [("gate", i) for i in range(3)]
        assert [replace(r, note=None) for r in served] == ob.get(ids)
        assert [r.note for r in ob.get(ids)] == [None] * 3
        later = ob.put("t/3", b"3", 1)
        assert [r.id for r in ob.pending(after_id=ids[-1])] == [later]


def test_rows_dropped_before_they_were_read_are_not_served(tmp_path: Path) -> None:
    clock = Clock()
    cfg = OutboxConfig(path=tmp_path / "o.sqlite", max_rows=10, max_age_s=60.0)
    with Outbox(cfg, clock=clock) as ob:
        first = ob.put("p", b"0", 1)
        assert [r.id for r in ob.pending()] == [first]  # the reader has caught up
        unread = [ob.put("p", f"{i}".encode(), 1) for i in range(1, 11)]  # evicts `first`
        assert [r.id for r in ob.pending(after_id=first)] == unread
        clock.t += 61.0
        fresh = ob.put("p", b"11", 1, priority=PRIORITY_KEEP)  # evicts unread[0]
        ob.maintain()  # expires the other unread pass rows
        assert [r.id for r in ob.pending(after_id=first)] == [fresh]


def test_rows_acknowledged_before_they_were_read_are_not_served(tmp_path: Path) -> None:
    with _outbox(tmp_path) as ob:
        ids = [ob.put("t", b"x", 1) for _ in range(3)]
        ob.ack([ids[1]])
        assert [r.id for r in ob.pending()] == [ids[0], ids[2]]


def test_a_reader_that_falls_far_behind_reads_from_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox_module, "_FRESH_MAX_ROWS", 3)
    with _outbox(tmp_path) as ob:
        ids = [ob.put(f"t/{i}", b"x", 1) for i in range(7)]
        assert [r.id for r in ob.pending(limit=4)] == ids[:4]
        assert [r.id for r in ob.pending(after_id=ids[3])] == ids[4:]
        assert [r.id for r in ob.pending(after_id=ids[-1])] == []
        new = ob.put("t/7", b"x", 1)
        assert [r.id for r in ob.pending(after_id=ids[-1])] == [new]


def test_storing_nothing_stores_nothing(tmp_path: Path) -> None:
    with _outbox(tmp_path) as ob:
        assert ob.put_many([]) == []
        assert ob.depth == 0 and ob.pending() == []
