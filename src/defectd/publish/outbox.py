"""The durable outbox: every message is committed to SQLite (WAL) before it is published and
removed only after the broker acknowledged it.

``put`` commits before it returns, so a result handed to the publisher survives a SIGKILL of
the daemon from then on (and a power cut with ``synchronous = "full"``). The publisher thread
reads pending rows in id order, publishes them and calls ``ack`` with the ids the broker
acknowledged. After a restart the pending rows are published again, oldest first.

Bounds (see ``OutboxConfig``): at ``max_rows`` the row of the lowest priority and then the
oldest is dropped to make room (pass results and events are ``PRIORITY_DROP_FIRST``; fail/error
results and rejects ``PRIORITY_KEEP``); droppable rows older than ``max_age_s`` expire. Every
drop is counted (``stats()``) and logged; dropped keep-priority rows are logged one by one with
their result id. Only one process may own an outbox file at a time (an exclusive lock file).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from defectd.errors import PublishError
from defectd.log import get_logger
from defectd.publish.config import OutboxConfig

log = get_logger(__name__)

PRIORITY_DROP_FIRST = 0
PRIORITY_KEEP = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    kind TEXT NOT NULL,
    message_id TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_priority_id ON outbox (priority, id);
"""
_COLUMNS = "id, topic, payload, qos, retain, priority, kind, message_id, created"
_SQL_CHUNK = 500  # ids per statement, well under SQLite's variable limit
_CHECKPOINT_EVERY_S = 10.0
_DROP_LOG_EVERY_S = 1.0


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """A message to store: ``payload`` is the encoded body; ``message_id`` the result/event id."""

    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    priority: int = PRIORITY_DROP_FIRST
    kind: str = ""
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A stored message; ``created`` is ``time.time()`` at ``put``."""

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    priority: int
    kind: str
    message_id: str | None
    created: float


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """Counters since this process opened the outbox (depth and age are of the file)."""

    depth: int
    oldest_age_s: float | None
    put: int
    acked: int
    dropped: int  # all drops, for the row bound and by age
    dropped_keep: int  # of which fail/error results and rejects
    expired: int  # of which by age
    near_bound: bool
    near_bound_warnings: int


@dataclass(frozen=True, slots=True)
class DropSummary:
    """Drops since the previous ``take_drops`` call, for the owner to report as an event."""

    rows: int
    keep_rows: int
    expired: int
    keep_ids: tuple[str, ...]  # result ids of dropped keep-priority rows (first 100)


def _row(t: tuple[object, ...]) -> OutboxRow:
    return OutboxRow(
        id=int(t[0]),  # type: ignore[call-overload]
        topic=str(t[1]),
        payload=bytes(t[2]),  # type: ignore[call-overload]
        qos=int(t[3]),  # type: ignore[call-overload]
        retain=bool(t[4]),
        priority=int(t[5]),  # type: ignore[call-overload]
        kind=str(t[6]),
        message_id=None if t[7] is None else str(t[7]),
        created=float(t[8]),  # type: ignore[arg-type]
    )


def _chunks(ids: Sequence[int]) -> Iterable[Sequence[int]]:
    for i in range(0, len(ids), _SQL_CHUNK):
        yield ids[i : i + _SQL_CHUNK]


class Outbox:
    """A SQLite outbox file owned by one process.

    Thread safety: ``put``/``put_many`` may be called from any thread; the reading side
    (``pending``, ``get``, ``ack``, ``maintain``) is meant for the one publisher thread but is
    locked too. Raises ``PublishError`` when the file cannot be opened or is locked by another
    process.
    """

    def __init__(self, config: OutboxConfig, *, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._clock = clock
        self._path = Path(config.path)
        self._wlock = threading.Lock()  # serialises write transactions and counters
        self._rlock = threading.Lock()  # guards the reader connection
        self._closed = False
        self._lockfile = self._lock_file()
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._w = self._connect(config.synchronous)
            self._r = self._connect("normal")
            self._w.executescript(_SCHEMA)
            # Checkpoints run from maintain() on the reader side, never inside put().
            self._w.execute("PRAGMA wal_autocheckpoint=0")
            self._depth = int(self._r.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        except sqlite3.Error as exc:
            self._release_lock_file()
            raise PublishError(f"outbox {self._path}: cannot open: {exc}") from exc
        self._put = 0
        self._acked = 0
        self._dropped = 0
        self._dropped_keep = 0
        self._expired = 0
        self._pending_drops = 0
        self._pending_keep = 0
        self._pending_expired = 0
        self._pending_keep_ids: list[str] = []
        self._unlogged_drops = 0
        self._last_drop_log = 0.0
        self._near = False
        self._near_warnings = 0
        self._last_checkpoint = time.monotonic()
        log.info("outbox_opened", path=str(self._path), depth=self._depth)

    # -- opening ---------------------------------------------------------------------------
    def _lock_file(self) -> IO[str]:
        lock_path = self._path.with_name(self._path.name + ".lock")
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(lock_path, "a+", encoding="utf-8")  # noqa: SIM115 - held until close()
        except OSError as exc:
            raise PublishError(f"outbox {self._path}: cannot create {lock_path}: {exc}") from exc
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "?"
            fh.close()
            raise PublishError(
                f"outbox {self._path} is in use by another process (pid {owner})"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        return fh

    def _release_lock_file(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self._lockfile, fcntl.LOCK_UN)
        self._lockfile.close()

    def _connect(self, synchronous: str) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path, isolation_level=None, check_same_thread=False, timeout=10.0
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        return conn

    @property
    def path(self) -> Path:
        return self._path

    @property
    def config(self) -> OutboxConfig:
        return self._config

    # -- writing ---------------------------------------------------------------------------
    def put(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool = False,
        *,
        priority: int = PRIORITY_DROP_FIRST,
        kind: str = "",
        message_id: str | None = None,
    ) -> int:
        """Store one message; returns its row id once the commit is done."""
        msg = OutboxMessage(topic, payload, qos, retain, priority, kind, message_id)
        return self.put_many((msg,))[0]

    def put_many(self, messages: Sequence[OutboxMessage]) -> list[int]:
        """Store messages in one transaction (e.g. a result and its reject); returns row ids.

        At the row bound, rows are dropped (lowest priority, then oldest) in the same
        transaction, so the file never holds more than ``max_rows``.
        """
        now = self._clock()
        with self._wlock:
            if self._closed:
                raise PublishError(f"outbox {self._path} is closed")
            try:
                self._w.execute("BEGIN IMMEDIATE")
                ids: list[int] = []
                for m in messages:
                    cur = self._w.execute(
                        "INSERT INTO outbox (topic, payload, qos, retain, priority, kind,"
                        " message_id, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            m.topic,
                            m.payload,
                            m.qos,
                            int(m.retain),
                            m.priority,
                            m.kind,
                            m.message_id,
                            now,
                        ),
                    )
                    ids.append(int(cur.lastrowid or 0))
                over = self._depth + len(ids) - self._config.max_rows
                dropped = self._evict(over) if over > 0 else []
                self._w.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._w.execute("ROLLBACK")
                raise PublishError(f"outbox {self._path}: cannot store a message: {exc}") from exc
            self._depth += len(ids) - len(dropped)
            self._put += len(ids)
            if dropped:
                self._count_drops(dropped, expired=False)
        return ids

    def _evict(self, n: int) -> list[tuple[int, int, str, str | None]]:
        rows = self._w.execute(
            "SELECT id, priority, kind, message_id FROM outbox ORDER BY priority, id LIMIT ?",
            (n,),
        ).fetchall()
        for chunk in _chunks([r[0] for r in rows]):
            self._w.execute(
                f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(chunk))})", tuple(chunk)
            )
        return [(int(r[0]), int(r[1]), str(r[2]), r[3]) for r in rows]

    def _count_drops(self, dropped: list[tuple[int, int, str, str | None]], expired: bool) -> None:
        # Called with _wlock held.
        keep = [d for d in dropped if d[1] >= PRIORITY_KEEP]
        self._dropped += len(dropped)
        self._pending_drops += len(dropped)
        self._dropped_keep += len(keep)
        self._pending_keep += len(keep)
        if expired:
            self._expired += len(dropped)
            self._pending_expired += len(dropped)
        for _, _, kind, message_id in keep:
            # A reject that cannot reach the PLC must never go unnoticed: one line each.
            log.error(
                "outbox_dropped_reject",
                kind=kind,
                result_id=message_id,
                reason="max_age" if expired else "max_rows",
                max_rows=self._config.max_rows,
            )
            if message_id is not None and len(self._pending_keep_ids) < 100:
                self._pending_keep_ids.append(message_id)
        self._unlogged_drops += len(dropped) - len(keep)
        now = time.monotonic()
        if self._unlogged_drops and now - self._last_drop_log >= _DROP_LOG_EVERY_S:
            log.warning(
                "outbox_dropped",
                rows=self._unlogged_drops,
                reason="max_age" if expired else "max_rows",
                dropped_total=self._dropped,
                depth=self._depth,
                max_rows=self._config.max_rows,
            )
            self._unlogged_drops = 0
            self._last_drop_log = now

    # -- reading and acknowledging (publisher thread) -----------------------------------------
    def pending(self, after_id: int = 0, limit: int = 100) -> list[OutboxRow]:
        """Up to ``limit`` stored rows with ``id > after_id``, oldest first."""
        with self._rlock:
            rows = self._r.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [_row(r) for r in rows]

    def get(self, ids: Sequence[int]) -> list[OutboxRow]:
        """The rows among ``ids`` that are still stored, in id order."""
        out: list[OutboxRow] = []
        with self._rlock:
            for chunk in _chunks(list(ids)):
                out.extend(
                    _row(r)
                    for r in self._r.execute(
                        f"SELECT {_COLUMNS} FROM outbox WHERE id IN"
                        f" ({','.join('?' * len(chunk))}) ORDER BY id",
                        tuple(chunk),
                    )
                )
        out.sort(key=lambda r: r.id)
        return out

    def ack(self, ids: Sequence[int]) -> int:
        """Remove acknowledged rows; returns how many were still stored."""
        if not ids:
            return 0
        removed = 0
        with self._wlock, self._rlock:
            if self._closed:
                return 0
            self._r.execute("BEGIN IMMEDIATE")
            try:
                for chunk in _chunks(list(ids)):
                    cur = self._r.execute(
                        f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(chunk))})",
                        tuple(chunk),
                    )
                    removed += cur.rowcount
                self._r.execute("COMMIT")
            except sqlite3.Error:
                with contextlib.suppress(sqlite3.Error):
                    self._r.execute("ROLLBACK")
                raise
            self._depth -= removed
            self._acked += removed
        return removed

    def maintain(self) -> None:
        """Expire droppable rows older than ``max_age_s`` and checkpoint the WAL now and then.

        Called about once a second by the publisher thread.
        """
        cutoff = self._clock() - self._config.max_age_s
        with self._wlock, self._rlock:
            if self._closed:
                return
            old = self._r.execute(
                "SELECT id, priority, kind, message_id, created FROM outbox"
                " WHERE priority = ? ORDER BY id LIMIT 1000",
                (PRIORITY_DROP_FIRST,),
            ).fetchall()
            expired = [(int(r[0]), int(r[1]), str(r[2]), r[3]) for r in old if r[4] < cutoff]
            if expired:
                self._r.execute("BEGIN IMMEDIATE")
                for chunk in _chunks([e[0] for e in expired]):
                    self._r.execute(
                        f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(chunk))})",
                        tuple(chunk),
                    )
                self._r.execute("COMMIT")
                self._depth -= len(expired)
                self._count_drops(expired, expired=True)
        now = time.monotonic()
        if now - self._last_checkpoint >= _CHECKPOINT_EVERY_S:
            self._last_checkpoint = now
            with self._rlock:
                if not self._closed:
                    self._r.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def take_drops(self) -> DropSummary | None:
        """Drops since the previous call (None when there were none)."""
        with self._wlock:
            if not self._pending_drops:
                return None
            summary = DropSummary(
                rows=self._pending_drops,
                keep_rows=self._pending_keep,
                expired=self._pending_expired,
                keep_ids=tuple(self._pending_keep_ids),
            )
            self._pending_drops = self._pending_keep = self._pending_expired = 0
            self._pending_keep_ids = []
            return summary

    # -- state -----------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Rows stored (not yet acknowledged)."""
        return self._depth

    def oldest_age_s(self) -> float | None:
        """Seconds since the oldest stored row was put (None when empty)."""
        with self._rlock:
            if self._closed:
                return None
            row = self._r.execute("SELECT created FROM outbox ORDER BY id LIMIT 1").fetchone()
        return None if row is None else max(0.0, self._clock() - float(row[0]))

    def check_near_bound(self) -> bool:
        """True on the transition into "near the bound" (rows or age past ``warn_fraction``).

        Logs a warning on that transition; the state clears below 90 % of the thresholds.
        """
        cfg = self._config
        age = self.oldest_age_s() or 0.0
        rows_frac = self._depth / cfg.max_rows
        age_frac = age / cfg.max_age_s
        level = max(rows_frac, age_frac)
        if not self._near and level >= cfg.warn_fraction:
            self._near = True
            self._near_warnings += 1
            log.warning(
                "outbox_near_bound",
                depth=self._depth,
                max_rows=cfg.max_rows,
                oldest_age_s=round(age, 1),
                max_age_s=cfg.max_age_s,
                path=str(self._path),
            )
            return True
        if self._near and level < cfg.warn_fraction * 0.9:
            self._near = False
            log.info("outbox_below_bound", depth=self._depth, oldest_age_s=round(age, 1))
        return False

    def stats(self) -> OutboxStats:
        return OutboxStats(
            depth=self._depth,
            oldest_age_s=self.oldest_age_s(),
            put=self._put,
            acked=self._acked,
            dropped=self._dropped,
            dropped_keep=self._dropped_keep,
            expired=self._expired,
            near_bound=self._near,
            near_bound_warnings=self._near_warnings,
        )

    def close(self) -> None:
        """Close the database and release the lock file (idempotent)."""
        with self._wlock, self._rlock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(sqlite3.Error):
                self._r.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._w.close()
            self._r.close()
        self._release_lock_file()
        log.info("outbox_closed", path=str(self._path), depth=self._depth)

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
