"""The outbox under storage faults: damaged files refused at start, disk full healed without
a restart, errors wrapped and rolled back, the age of the oldest unacknowledged result.

Disk-full tests run on a small tmpfs when this machine lets the test mount one (root); the same
logic is also driven through a connection class that injects SQLite errors, which runs anywhere.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from defectd.errors import PublishError
from defectd.publish.config import OutboxConfig
from defectd.publish.outbox import (
    FAULT_DAMAGED,
    FAULT_DISK_FULL,
    PRIORITY_KEEP,
    Outbox,
    OutboxDamagedError,
    check_outbox_file,
)

PAYLOAD = b'{"verdict": "pass", "defects": [], "pad": "' + b"x" * 300 + b'"}'


def _filled(path: Path, rows: int = 400) -> list[int]:
    with Outbox(OutboxConfig(path=path, reserve_bytes=0)) as ob:
        return [ob.put("t/s/c/result", PAYLOAD, 1, message_id=f"r{i}") for i in range(rows)]


def _assert_refused(path: Path) -> str:
    with pytest.raises(OutboxDamagedError) as info:
        Outbox(OutboxConfig(path=path))
    text = str(info.value)
    assert str(path) in text
    assert "forensics" in text and f"mv {path} " in text and "new, empty outbox" in text
    return text


# -- integrity at start --------------------------------------------------------------------


def test_a_new_outbox_file_is_never_empty_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    with Outbox(OutboxConfig(path=path)):
        assert path.stat().st_size > 0
    assert not (tmp_path / "outbox.sqlite.new").exists()
    assert check_outbox_file(path) == 0


def test_a_zero_length_outbox_stops_the_start_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    _filled(path, 20)
    path.write_bytes(b"")
    assert "empty (0 bytes)" in _assert_refused(path)
    assert path.stat().st_size == 0  # left as it was, for forensics


def test_a_wal_without_its_database_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    (tmp_path / "outbox.sqlite-wal").write_bytes(b"\x37\x7f\x06\x82" + bytes(100))
    assert "missing" in _assert_refused(path)


def test_header_garbage_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    _filled(path, 20)
    with open(path, "r+b") as fh:
        fh.write(b"garbage garbage!")
    assert "not a SQLite database" in _assert_refused(path)


def test_one_random_page_of_damage_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    _filled(path)
    pages = path.stat().st_size // 4096
    rng = random.Random(7)
    page = rng.randrange(2, pages)
    with open(path, "r+b") as fh:
        fh.seek(page * 4096)
        fh.write(rng.randbytes(4096))
    _assert_refused(path)


@pytest.mark.parametrize("seed", range(5))
def test_twenty_byte_flips_stop_the_start(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "outbox.sqlite"
    _filled(path)
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    for _ in range(20):
        i = rng.randrange(4096, len(data))  # past the header page: that one is checked apart
        data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    _assert_refused(path)


def test_a_payload_changed_in_place_fails_its_checksum(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    _filled(path, 5)
    data = path.read_bytes()
    i = data.index(b"xxxxxxxx")
    path.write_bytes(data[:i] + b"yyyyyyyy" + data[i + 8 :])
    assert "fail their checksum" in _assert_refused(path)


def test_an_outbox_of_the_first_format_opens_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,"
        " payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL,"
        " priority INTEGER NOT NULL, kind TEXT NOT NULL, message_id TEXT, created REAL NOT NULL);"
        " INSERT INTO outbox (topic, payload, qos, retain, priority, kind, message_id, created)"
        " VALUES ('t', x'7b7d', 1, 0, 1, 'result', 'old', 1.0);"
    )
    conn.close()
    with Outbox(OutboxConfig(path=path)) as ob:
        new = ob.put("t", b"{}", 1)
        rows = ob.pending()
    assert [(r.message_id, r.crc is None) for r in rows] == [("old", True), (None, False)]
    assert rows[-1].id == new


# -- storage errors are wrapped, rolled back and recorded ------------------------------------


class FaultyConnection(sqlite3.Connection):
    """Raises a SQLite error for statements that match while ``rules`` say so.

    ``rules`` (shared by all connections) maps a SQL fragment to [error code, times left];
    times -1 means until removed.
    """

    rules: ClassVar[dict[str, list[int]]] = {}

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
        for fragment, rule in list(self.rules.items()):
            if fragment in sql and rule[1] != 0:
                rule[1] -= 1
                exc = sqlite3.OperationalError(
                    "database or disk is full" if rule[0] == sqlite3.SQLITE_FULL else "I/O error"
                )
                exc.sqlite_errorcode = rule[0]  # type: ignore[attr-defined]
                raise exc
        return super().execute(sql, *args)


@pytest.fixture
def faulty() -> Iterator[dict[str, list[int]]]:
    FaultyConnection.rules = {}
    yield FaultyConnection.rules
    FaultyConnection.rules = {}


def _faulty_outbox(tmp_path: Path, **cfg: Any) -> Outbox:
    cfg.setdefault("reserve_bytes", 64 * 1024)
    return Outbox(
        OutboxConfig(path=tmp_path / "outbox.sqlite", **cfg),
        connection_factory=FaultyConnection,
    )


def test_ack_failure_is_a_publish_error_and_removes_nothing(
    tmp_path: Path, faulty: dict[str, list[int]]
) -> None:
    with _faulty_outbox(tmp_path) as ob:
        ids = [ob.put("t", b"x", 1) for _ in range(3)]
        faulty["DELETE"] = [sqlite3.SQLITE_IOERR, -1]
        with pytest.raises(PublishError, match="cannot remove acknowledged rows"):
            ob.ack(ids)
        assert ob.fault is not None and ob.fault.kind == "io"
        del faulty["DELETE"]
        assert [r.id for r in ob.pending()] == ids  # rolled back: nothing half-removed
        assert ob.ack(ids) == 3
        assert ob.fault is None and ob.depth == 0


def test_maintain_rolls_back_a_failed_expiry_and_the_next_write_works(
    tmp_path: Path, faulty: dict[str, list[int]]
) -> None:
    now = [1000.0]
    ob = Outbox(
        OutboxConfig(path=tmp_path / "o.sqlite", max_age_s=10.0),
        clock=lambda: now[0],
        connection_factory=FaultyConnection,
    )
    with ob:
        old = ob.put("p", b"x", 1)
        now[0] += 20.0
        faulty["DELETE"] = [sqlite3.SQLITE_IOERR, 1]
        with pytest.raises(PublishError, match="cannot expire rows"):
            ob.maintain()
        assert [r.id for r in ob.pending()] == [old]
        new = ob.put("p", b"y", 1)  # no transaction was left open
        ob.maintain()  # the expiry is tried again
        assert [r.id for r in ob.pending()] == [new]
        assert ob.stats().expired == 1


def test_a_full_disk_gives_up_the_reserve_checkpoints_and_the_write_goes_through(
    tmp_path: Path, faulty: dict[str, list[int]]
) -> None:
    with _faulty_outbox(tmp_path) as ob:
        reserve = tmp_path / "outbox.sqlite.reserve"
        assert reserve.stat().st_size == 64 * 1024
        faulty["INSERT"] = [sqlite3.SQLITE_FULL, 1]
        row = ob.put("t", b"x", 1, priority=PRIORITY_KEEP)
        assert [r.id for r in ob.pending()] == [row]
        stats = ob.stats()
        # Given up, the log checkpointed, and taken back as the disk (here) had room.
        assert (stats.reserve_releases, stats.reserve_held, stats.fault) == (1, True, None)
        assert reserve.stat().st_size == 64 * 1024


def test_new_results_never_eat_the_room_that_acknowledgements_need(
    tmp_path: Path, faulty: dict[str, list[int]]
) -> None:
    with _faulty_outbox(tmp_path) as ob:
        first = ob.put("t", b"x", 1, priority=PRIORITY_KEEP)
        free: list[int | None] = [0]
        ob.free_bytes = lambda: free[0]  # type: ignore[method-assign]
        faulty["INSERT"] = [sqlite3.SQLITE_FULL, 1]
        with pytest.raises(PublishError, match="cannot store a message"):
            ob.put("t", b"x", 1, priority=PRIORITY_KEEP)
        assert not (tmp_path / "outbox.sqlite.reserve").exists()  # its room is kept free
        assert ob.fault is not None and ob.fault.kind == FAULT_DISK_FULL
        faulty["DELETE"] = [sqlite3.SQLITE_FULL, 1]
        assert ob.ack([first]) == 1  # a shrinking write may use that room
        free[0] = None
        del ob.free_bytes
        ob.maintain()
        assert ob.stats().reserve_held


def test_a_disk_that_stays_full_is_a_fault_until_a_write_succeeds(
    tmp_path: Path, faulty: dict[str, list[int]]
) -> None:
    with _faulty_outbox(tmp_path) as ob:
        faulty["INSERT"] = [sqlite3.SQLITE_FULL, -1]
        for _ in range(2):
            with pytest.raises(PublishError, match="cannot store a message"):
                ob.put("t", b"x", 1)
        assert ob.fault is not None and ob.fault.kind == FAULT_DISK_FULL
        assert ob.depth == 0
        del faulty["INSERT"]
        ob.put("t", b"x", 1)  # same process, same connections: healed
        assert ob.fault is None and ob.depth == 1


def test_a_failed_checkpoint_is_retried_on_the_next_maintain(
    tmp_path: Path, faulty: dict[str, list[int]]
) -> None:
    cfg: dict[str, Any] = {"checkpoint_interval_s": 3600.0, "wal_max_bytes": 64 * 1024}
    with _faulty_outbox(tmp_path, reserve_bytes=0, **cfg) as ob:
        for _ in range(50):
            ob.put("t", PAYLOAD, 1)  # the WAL outgrows wal_max_bytes: a checkpoint is due
        faulty["wal_checkpoint"] = [sqlite3.SQLITE_IOERR, 1]
        ob.maintain()
        assert ob.stats().checkpoint_failures == 1
        wal = tmp_path / "outbox.sqlite-wal"
        assert wal.stat().st_size > 0
        ob.maintain()  # not waiting another interval
        assert wal.stat().st_size == 0
        assert ob.stats().checkpoint_failures == 1


def test_a_row_damaged_while_running_is_left_out_and_reported(tmp_path: Path) -> None:
    with Outbox(OutboxConfig(path=tmp_path / "o.sqlite")) as ob:
        a, b, c = (ob.put("t", b"payload-%d" % i, 1) for i in range(3))
    # A backlog from before a restart is read back from the file (a reader that keeps up is
    # served what was just written from memory, which the file's damage does not reach).
    with Outbox(OutboxConfig(path=tmp_path / "o.sqlite")) as ob:
        with sqlite3.connect(tmp_path / "o.sqlite") as other:
            other.execute("UPDATE outbox SET payload = x'00' WHERE id = ?", (b,))
        assert [r.id for r in ob.pending()] == [a, c]
        assert ob.fault is not None and ob.fault.kind == FAULT_DAMAGED
        ob.put("t", b"more", 1)
        assert ob.fault is not None and ob.fault.kind == FAULT_DAMAGED  # sticky


def test_the_age_of_the_oldest_unacknowledged_result(tmp_path: Path) -> None:
    now = [1000.0]
    with Outbox(OutboxConfig(path=tmp_path / "o.sqlite"), clock=lambda: now[0]) as ob:
        assert ob.oldest_age_s(("result", "reject")) is None
        ob.put("e", b"x", 1, kind="event")
        now[0] += 5.0
        r = ob.put("r", b"x", 1, kind="result")
        now[0] += 3.0
        assert ob.oldest_age_s() == pytest.approx(8.0)
        assert ob.oldest_age_s(("result", "reject")) == pytest.approx(3.0)
        ob.ack([r])
        assert ob.oldest_age_s(("result", "reject")) is None


# -- a real full disk: a small tmpfs -----------------------------------------------------------


def _fill(where: Path) -> Path:
    filler = where / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(bytes(4096))
        except OSError:
            pass
    return filler


def test_a_filled_tmpfs_heals_when_space_is_freed_without_a_restart(
    tmpfs: Callable[[int], Path],
) -> None:
    where = tmpfs(2 * 1024 * 1024)
    cfg = OutboxConfig(path=where / "outbox.sqlite", reserve_bytes=256 * 1024)
    with Outbox(cfg) as ob:
        assert ob.stats().reserve_held
        stored = [ob.put("t", PAYLOAD, 1, priority=PRIORITY_KEEP) for _ in range(20)]
        filler = _fill(where)
        with pytest.raises(PublishError, match="cannot store a message"):
            for _ in range(10_000):  # the reserve goes first, then the disk is full again
                stored.append(ob.put("t", PAYLOAD, 1, priority=PRIORITY_KEEP))
        assert ob.fault is not None and ob.fault.kind == FAULT_DISK_FULL
        assert ob.stats().reserve_releases >= 1
        filler.unlink()
        stored.append(ob.put("t", PAYLOAD, 1, priority=PRIORITY_KEEP))
        assert ob.fault is None
        ob.maintain()
        assert ob.stats().reserve_held
        assert [r.id for r in ob.pending(limit=100_000)] == stored
    assert check_outbox_file(where / "outbox.sqlite") == len(stored)


def test_a_wal_that_filled_the_disk_is_checkpointed_once_acks_free_rows(
    tmpfs: Callable[[int], Path],
) -> None:
    # Broker away: no acks and no checkpoints until the WAL has taken the whole disk.
    where = tmpfs(1024 * 1024)
    cfg = OutboxConfig(
        path=where / "outbox.sqlite", reserve_bytes=128 * 1024, checkpoint_interval_s=3600.0
    )
    with Outbox(cfg) as ob:
        stored: list[int] = []
        with pytest.raises(PublishError):
            for _ in range(100_000):
                stored.append(ob.put("t", PAYLOAD, 1, priority=PRIORITY_KEEP))
        assert ob.fault is not None and ob.fault.kind == FAULT_DISK_FULL
        # The broker is back: rows are acknowledged in the publisher's batches (at most
        # max_inflight), the WAL is checkpointed, writes resume.
        for i in range(0, len(stored), 100):
            assert ob.ack(stored[i : i + 100]) == len(stored[i : i + 100])
        ob.maintain()
        ob.maintain()
        more = [ob.put("t", PAYLOAD, 1, priority=PRIORITY_KEEP) for _ in range(50)]
        assert ob.fault is None
        assert [r.id for r in ob.pending()] == more
