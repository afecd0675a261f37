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

Integrity: a new outbox is created under a temporary name and renamed into place, so the file
is never empty once it exists. Opening an existing file runs ``check_outbox_file``: SQLite
header, ``PRAGMA quick_check``, the ``outbox`` table and its columns, and the CRC-32 stored with
every payload. A damaged file stops the start with ``OutboxDamagedError``, whose message names
the file, how to keep it for forensics and how to start with a new one; it is never replaced
silently. Damage found while running (a checksum mismatch, ``SQLITE_CORRUPT``) is a sticky
``fault`` (see ``Outbox.fault``) for the owner to report.

Disk full: a reserve file (``OutboxConfig.reserve_bytes``) keeps room for the writes that
shrink the outbox. A write that finds the disk full gives up the reserve, checkpoints the
write-ahead log (so that its space returns to the disk) and takes the reserve back; only when
that succeeds is the write tried once more, so new results never eat the room that the
acknowledgements need. After acknowledgements ``maintain`` returns free pages to the disk
(``incremental_vacuum``) and takes the reserve again. A failed checkpoint is retried on the next
``maintain`` call; the log is also checkpointed by SQLite itself past ``wal_max_bytes``.
Every storage error is raised as ``PublishError`` and recorded as the outbox's ``fault`` until
a later write succeeds.

This module is over 600 lines because the integrity check, the disk-full recovery and the
bounds all act on the same two connections and locks; split apart they would share state.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

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
# Added after the first release: files without it are migrated at open (old rows: NULL).
_CRC_COLUMN = "crc"
_REQUIRED_COLUMNS = frozenset(
    {"id", "topic", "payload", "qos", "retain", "priority", "kind", "message_id", "created"}
)
_COLUMNS = "id, topic, payload, qos, retain, priority, kind, message_id, created, crc"
_SQL_CHUNK = 500  # ids per statement, well under SQLite's variable limit
_DROP_LOG_EVERY_S = 1.0
_SQLITE_HEADER = b"SQLite format 3\x00"
_FAULT_LOG_EVERY_S = 5.0
_RESERVE_MARGIN = 256 * 1024  # free space left beside the reserve before it is taken

T = TypeVar("T")

FAULT_DISK_FULL = "disk_full"
FAULT_DAMAGED = "damaged"
FAULT_IO = "io"


class OutboxDamagedError(PublishError):
    """The outbox file is damaged; the message says how to keep it and how to start afresh."""


@dataclass(frozen=True, slots=True)
class OutboxFault:
    """Why the outbox cannot store or read messages right now.

    ``kind``: ``disk_full`` (clears once a write succeeds), ``io`` (likewise) or ``damaged``
    (stays until the file is replaced). ``since`` is ``time.monotonic()`` of the first error.
    """

    kind: str
    detail: str
    since: float


def damaged_message(path: Path, why: str) -> str:
    """The one-line error for a damaged outbox file: what, how to keep it, how to go on."""
    keep = f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
    return (
        f"outbox {path} is damaged ({why}); the station does not start on it, because the"
        f" results it holds would be lost without a word. Keep it for forensics:"
        f" mv {path} {path.with_name(keep)} (with its -wal and -shm files, if any; `sqlite3"
        f" FILE .recover` may save rows), then start again to begin with a new, empty outbox"
    )


def check_outbox_file(path: Path) -> int | None:
    """Check an outbox file before it is used; returns its row count (None: no file yet).

    Checks: not empty, a SQLite header, ``PRAGMA quick_check``, the ``outbox`` table with its
    columns, and the CRC-32 of every row that has one. Raises ``OutboxDamagedError`` naming
    the file and what failed; a write-ahead log without its database is damage too.
    """
    wal = path.with_name(path.name + "-wal")
    if not path.exists():
        if wal.exists() and wal.stat().st_size > 0:
            raise OutboxDamagedError(
                damaged_message(path, f"the database file is missing but {wal.name} exists")
            )
        return None
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            header = fh.read(len(_SQLITE_HEADER))
    except OSError as exc:
        raise PublishError(f"outbox {path}: cannot read: {exc}") from exc
    if size == 0:
        raise OutboxDamagedError(
            damaged_message(path, "the file is empty (0 bytes); an outbox is never empty once made")
        )
    if header != _SQLITE_HEADER:
        raise OutboxDamagedError(damaged_message(path, "not a SQLite database (bad header)"))
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=10.0)
    except sqlite3.Error as exc:
        raise OutboxDamagedError(damaged_message(path, f"cannot open: {exc}")) from exc
    try:
        problems = [str(r[0]) for r in conn.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise OutboxDamagedError(damaged_message(path, "quick_check: " + "; ".join(problems)))
        columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(outbox)")}
        if not columns:
            raise OutboxDamagedError(damaged_message(path, "it has no outbox table"))
        missing = sorted(_REQUIRED_COLUMNS - columns)
        if missing:
            raise OutboxDamagedError(
                damaged_message(path, f"the outbox table lacks columns {', '.join(missing)}")
            )
        rows = int(conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        if _CRC_COLUMN in columns:
            bad = [
                int(rid)
                for rid, payload, crc in conn.execute(
                    "SELECT id, payload, crc FROM outbox WHERE crc IS NOT NULL"
                )
                if zlib.crc32(bytes(payload)) != crc
            ]
            if bad:
                ids = ", ".join(str(i) for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
                raise OutboxDamagedError(
                    damaged_message(path, f"{len(bad)} rows fail their checksum (ids {ids})")
                )
    except sqlite3.Error as exc:
        raise OutboxDamagedError(damaged_message(path, str(exc))) from exc
    finally:
        conn.close()
    return rows


def classify_error(exc: sqlite3.Error, free_bytes: int | None = None) -> str:
    """``disk_full``, ``damaged`` or ``io`` for a SQLite error (``free_bytes``: of the disk)."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = None if code is None else code & 0xFF
    if primary == sqlite3.SQLITE_FULL or "disk is full" in str(exc):
        return FAULT_DISK_FULL
    if primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB) or "malformed" in str(exc):
        return FAULT_DAMAGED
    if primary == sqlite3.SQLITE_IOERR and free_bytes is not None and free_bytes < 64 * 1024:
        return FAULT_DISK_FULL  # e.g. growing the WAL index on a full disk
    return FAULT_IO


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
    note: object = None  # what the writer knows of the message; not stored (see OutboxRow)


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
    crc: int | None = None  # CRC-32 of payload (None for rows stored by older versions)
    # The writer's ``OutboxMessage.note`` on rows served from memory; None on rows read back
    # from the file (after a restart, a backlog): the reader works it out from the payload.
    note: object = None


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
    fault: OutboxFault | None = None
    reserve_held: bool = False
    reserve_releases: int = 0
    checkpoint_failures: int = 0
    free_bytes: int | None = None  # on the outbox's file system


@dataclass(frozen=True, slots=True)
class DropSummary:
    """Drops since the previous ``take_drops`` call, for the owner to report as an event."""

    rows: int
    keep_rows: int
    expired: int
    keep_ids: tuple[str, ...]  # result ids of dropped keep-priority rows (first 100)


@dataclass(slots=True)
class _DropTally:
    """Rows dropped: all of them, those of keep priority, and those that expired (by age)."""

    rows: int = 0
    keep_rows: int = 0
    expired: int = 0

    def add(self, rows: int, keep_rows: int, expired: bool) -> None:
        self.rows += rows
        self.keep_rows += keep_rows
        if expired:
            self.expired += rows


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
        crc=None if t[9] is None else int(t[9]),  # type: ignore[call-overload]
    )


def _chunks(ids: Sequence[int]) -> Iterable[Sequence[int]]:
    for i in range(0, len(ids), _SQL_CHUNK):
        yield ids[i : i + _SQL_CHUNK]


_Dropped = tuple[int, int, str, "str | None"]  # id, priority, kind, message_id
_FRESH_MAX_ROWS = 4096  # rows kept in memory for a reader that keeps up (~3 MB of results)


class Outbox:
    """A SQLite outbox file owned by one process.

    Thread safety: ``put``/``put_many`` may be called from any thread; the reading side
    (``pending``, ``get``, ``ack``, ``maintain``) is meant for the one publisher thread but is
    locked too. Raises ``PublishError`` when the file cannot be opened or is locked by another
    process, ``OutboxDamagedError`` when the file fails its integrity check.

    ``connection_factory`` is the ``sqlite3.Connection`` class of both connections (tests
    pass one that injects errors: a full disk, a failed checkpoint).
    """

    def __init__(
        self,
        config: OutboxConfig,
        *,
        clock: Callable[[], float] = time.time,
        connection_factory: type[sqlite3.Connection] = sqlite3.Connection,
    ) -> None:
        self._config = config
        self._clock = clock
        self._factory = connection_factory
        self._path = Path(config.path)
        self._reserve_path = self._path.with_name(self._path.name + ".reserve")
        self._wlock = threading.Lock()  # serialises write transactions and counters
        self._rlock = threading.Lock()  # guards the reader connection
        self._closed = False
        self._lockfile = self._lock_file()
        try:
            t0 = time.monotonic()
            rows = check_outbox_file(self._path)
            if rows is None:
                self._create_file()
            self._w = self._connect(config.synchronous)
            self._r = self._connect("normal")
            self._w.executescript(_SCHEMA)
            columns = {str(r[1]) for r in self._w.execute("PRAGMA table_info(outbox)")}
            if _CRC_COLUMN not in columns:
                self._w.execute(f"ALTER TABLE outbox ADD COLUMN {_CRC_COLUMN} INTEGER")
            # Checkpoints run from maintain() on the reader side at half of wal_max_bytes; the
            # automatic one inside a commit is the backstop when maintain falls behind.
            self._w.execute(f"PRAGMA wal_autocheckpoint={max(16, config.wal_max_bytes // 4096)}")
            self._incremental = int(self._w.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2
            self._depth = int(self._r.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
            last_id = int(self._r.execute("SELECT COALESCE(MAX(id), 0) FROM outbox").fetchone()[0])
        except sqlite3.Error as exc:
            self._release_lock_file()
            raise PublishError(f"outbox {self._path}: cannot open: {exc}") from exc
        except BaseException:
            self._release_lock_file()
            raise
        self._put = 0
        # Rows stored since the reader last caught up, in id order, so that ``pending`` serves
        # a publisher that keeps up from memory instead of reading back what was just written.
        # Every stored row with an id above ``_fresh_after`` is in ``_fresh`` (ids only grow:
        # AUTOINCREMENT). A drop or an overflow empties it, and reads go to the file again.
        self._fresh_lock = threading.Lock()
        self._fresh: deque[OutboxRow] = deque()
        self._fresh_after = last_id
        self._last_id = last_id
        self._acked = 0
        self._drops = _DropTally()  # since the outbox was opened (``stats``)
        self._pending = _DropTally()  # since the last ``take_drops``
        self._pending_keep_ids: list[str] = []
        self._unlogged_drops = 0
        self._last_drop_log = 0.0
        self._near = False
        self._near_warnings = 0
        self._last_checkpoint = time.monotonic()
        self._checkpoint_due = False
        self._checkpoint_failures = 0
        self._fault: OutboxFault | None = None
        self._last_fault_log = 0.0
        self._bad_rows: set[int] = set()
        self._reserve_held = False
        self._reserve_releases = 0
        self._last_release_log = 0.0
        self._take_reserve()
        log.info(
            "outbox_opened",
            path=str(self._path),
            depth=self._depth,
            new=rows is None,
            check_s=round(time.monotonic() - t0, 3),
            reserve_bytes=config.reserve_bytes if self._reserve_held else 0,
        )

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

    def _create_file(self) -> None:
        """Make a new, empty outbox under a temporary name and rename it into place, so that
        an outbox file that exists is never empty (an empty one is damage)."""
        tmp = self._path.with_name(self._path.name + ".new")
        try:
            for f in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
                f.unlink(missing_ok=True)
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                # Free pages can go back to the disk after a disk-full episode (maintain()).
                conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
                conn.execute(f"ALTER TABLE outbox ADD COLUMN {_CRC_COLUMN} INTEGER")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._path)
            dfd = os.open(self._path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except (OSError, sqlite3.Error) as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise PublishError(f"outbox {self._path}: cannot create: {exc}") from exc

    def _connect(self, synchronous: str) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path,
            isolation_level=None,
            check_same_thread=False,
            timeout=10.0,
            factory=self._factory,
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        # After a checkpoint resets the log, shrink it back: space a full disk may need.
        conn.execute(f"PRAGMA journal_size_limit={self._config.wal_max_bytes}")
        return conn

    @property
    def path(self) -> Path:
        return self._path

    @property
    def config(self) -> OutboxConfig:
        return self._config

    # -- faults, disk space and the reserve ------------------------------------------------
    @property
    def fault(self) -> OutboxFault | None:
        """The current storage fault (None while writes and reads succeed)."""
        return self._fault

    def free_bytes(self) -> int | None:
        """Bytes free to this process on the outbox's file system (None when unknown)."""
        try:
            st = os.statvfs(self._path.parent)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def _set_fault(self, kind: str, detail: str) -> None:
        now = time.monotonic()
        old = self._fault
        if old is not None and old.kind == FAULT_DAMAGED and kind != FAULT_DAMAGED:
            return  # damage stays the headline until the file is replaced
        if old is None or old.kind != kind:
            self._fault = OutboxFault(kind, detail, now)
            log.error("outbox_fault", kind=kind, detail=detail, path=str(self._path))
            self._last_fault_log = now
        else:
            self._fault = OutboxFault(kind, detail, old.since)
            if now - self._last_fault_log >= _FAULT_LOG_EVERY_S:
                self._last_fault_log = now
                log.error("outbox_fault", kind=kind, detail=detail, path=str(self._path))

    def _clear_fault(self) -> None:
        old = self._fault
        if old is None or old.kind == FAULT_DAMAGED:
            return
        self._fault = None
        log.info(
            "outbox_recovered",
            kind=old.kind,
            after_s=round(time.monotonic() - old.since, 3),
            path=str(self._path),
        )

    def _take_reserve(self) -> bool:
        """Hold ``reserve_bytes`` in ``<path>.reserve`` when the disk has room for it and a
        margin (``_RESERVE_MARGIN``)."""
        n = self._config.reserve_bytes
        if n == 0 or self._reserve_held:
            return self._reserve_held
        try:
            have = self._reserve_path.stat().st_size
        except OSError:
            have = 0
        if have >= n:
            self._reserve_held = True
            return True
        free = self.free_bytes()
        if free is None or free < n - have + _RESERVE_MARGIN:
            return False
        try:
            fd = os.open(self._reserve_path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                try:
                    os.posix_fallocate(fd, 0, n)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    os.pwrite(fd, bytes(n), 0)  # a file system without fallocate
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                self._reserve_path.unlink()
            log.warning("outbox_reserve_failed", path=str(self._reserve_path), error=str(exc))
            return False
        self._reserve_held = True
        return True

    def _release_reserve(self) -> bool:
        if not self._reserve_held:
            return False
        try:
            self._reserve_path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("outbox_reserve_release_failed", error=str(exc))
            return False
        self._reserve_held = False
        self._reserve_releases += 1
        now = time.monotonic()
        if now - self._last_release_log >= _FAULT_LOG_EVERY_S:
            self._last_release_log = now
            log.error(
                "outbox_reserve_released",
                path=str(self._path),
                reserve_bytes=self._config.reserve_bytes,
                free_bytes=self.free_bytes(),
                releases=self._reserve_releases,
                hint="the disk is full: free space on it; the reserve is taken again then",
            )
        return True

    def _checkpoint(self, conn: sqlite3.Connection, mode: str) -> bool:
        """Checkpoint the WAL; False (and due again on the next ``maintain``) when it fails."""
        try:
            row = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        except sqlite3.Error as exc:
            ok, why = False, str(exc)
            full = classify_error(exc, self.free_bytes()) == FAULT_DISK_FULL
            if full and self._release_reserve():
                return self._checkpoint(conn, mode)
        else:
            ok, why = row is not None and int(row[0]) == 0, "busy"
        self._last_checkpoint = time.monotonic()
        self._checkpoint_due = not ok
        if not ok:
            self._checkpoint_failures += 1
            log.warning("outbox_checkpoint_failed", mode=mode, error=why, path=str(self._path))
        return ok

    def _vacuum(self) -> None:
        """Return the file's free pages to the disk (files made with incremental auto-vacuum),
        so the reserve can be taken again after a disk-full episode. Best effort."""
        if not self._incremental:
            return
        try:
            free_pages = int(self._r.execute("PRAGMA freelist_count").fetchone()[0])
            if free_pages:
                self._r.execute("PRAGMA incremental_vacuum").fetchall()
                self._checkpoint(self._r, "TRUNCATE")
        except sqlite3.Error as exc:
            log.warning("outbox_vacuum_failed", error=str(exc), path=str(self._path))

    def _wal_bytes(self) -> int:
        try:
            return self._path.with_name(self._path.name + "-wal").stat().st_size
        except OSError:
            return 0

    def _make_room(self, conn: sqlite3.Connection, shrinks: bool) -> bool:
        """After a write found the disk full: give up the reserve and checkpoint, so the log's
        space returns to the disk. Whether to try the write again: always for one that shrinks
        the outbox, for one that grows it only when the reserve could be taken back."""
        released = self._release_reserve()
        checkpointed = self._checkpoint(conn, "TRUNCATE")
        if self._config.reserve_bytes == 0:
            return checkpointed
        retaken = self._take_reserve()
        return (released or checkpointed) if shrinks else retaken

    def _transaction(
        self,
        conn: sqlite3.Connection,
        body: Callable[[sqlite3.Connection], T],
        what: str,
        *,
        shrinks: bool = False,
    ) -> T:
        """Run ``body`` in one write transaction. On a full disk make room (``_make_room``)
        and try once more; any failure is rolled back, recorded as the fault and raised as
        ``PublishError``. ``shrinks``: the write removes rows (may use the reserve's room).
        Called with the lock(s) of ``conn`` held."""
        for attempt in (0, 1):
            try:
                conn.execute("BEGIN IMMEDIATE")
                result = body(conn)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                kind = classify_error(exc, self.free_bytes())
                if attempt == 0 and kind == FAULT_DISK_FULL and self._make_room(conn, shrinks):
                    continue
                self._set_fault(kind, f"cannot {what}: {exc}")
                if kind == FAULT_DAMAGED:
                    raise OutboxDamagedError(damaged_message(self._path, str(exc))) from exc
                raise PublishError(f"outbox {self._path}: cannot {what}: {exc}") from exc
            self._clear_fault()
            return result
        raise AssertionError("unreachable")  # pragma: no cover

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
        transaction, so the file never holds more than ``max_rows``. Raises ``PublishError``
        when nothing was stored (disk full even after giving up the reserve, I/O error,
        damage); the messages are then not in the outbox.
        """
        now = self._clock()
        crcs = [zlib.crc32(m.payload) for m in messages]

        def insert(conn: sqlite3.Connection) -> tuple[list[int], list[_Dropped]]:
            ids: list[int] = []
            for m, crc in zip(messages, crcs, strict=True):
                cur = conn.execute(
                    "INSERT INTO outbox (topic, payload, qos, retain, priority, kind,"
                    " message_id, created, crc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        m.topic,
                        m.payload,
                        m.qos,
                        int(m.retain),
                        m.priority,
                        m.kind,
                        m.message_id,
                        now,
                        crc,
                    ),
                )
                ids.append(int(cur.lastrowid or 0))
            over = self._depth + len(ids) - self._config.max_rows
            return ids, (self._evict(conn, over) if over > 0 else [])

        with self._wlock:
            if self._closed:
                raise PublishError(f"outbox {self._path} is closed")
            ids, dropped = self._transaction(self._w, insert, "store a message")
            self._depth += len(ids) - len(dropped)
            self._put += len(ids)
            if dropped:
                self._count_drops(dropped, expired=False)
            rows = [
                OutboxRow(
                    i, m.topic, m.payload, m.qos, m.retain, m.priority, m.kind, m.message_id,
                    now, crc, m.note,
                )
                for i, m, crc in zip(ids, messages, crcs, strict=True)
            ]  # fmt: skip
            with self._fresh_lock:
                self._last_id = max([self._last_id, *ids])
                if dropped or len(self._fresh) + len(rows) > _FRESH_MAX_ROWS:
                    self._forget_fresh()
                else:
                    self._fresh.extend(rows)
        return ids

    def _forget_fresh(self) -> None:
        """Serve every row stored so far from the file (``_fresh_lock`` held)."""
        self._fresh.clear()
        self._fresh_after = self._last_id

    def _evict(self, conn: sqlite3.Connection, n: int) -> list[_Dropped]:
        rows = conn.execute(
            "SELECT id, priority, kind, message_id FROM outbox ORDER BY priority, id LIMIT ?",
            (n,),
        ).fetchall()
        _delete(conn, [r[0] for r in rows])
        return [(int(r[0]), int(r[1]), str(r[2]), r[3]) for r in rows]

    def _count_drops(self, dropped: list[_Dropped], expired: bool) -> None:
        # Called with _wlock held.
        keep = [d for d in dropped if d[1] >= PRIORITY_KEEP]
        for tally in (self._drops, self._pending):
            tally.add(len(dropped), len(keep), expired)
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
                dropped_total=self._drops.rows,
                depth=self._depth,
                max_rows=self._config.max_rows,
            )
            self._unlogged_drops = 0
            self._last_drop_log = now

    # -- reading and acknowledging (publisher thread) -----------------------------------------
    def _read(self, sql: str, params: tuple[object, ...]) -> list[OutboxRow]:
        """Run a row query on the reader connection (``_rlock`` held) and check every row's
        CRC: a row that fails it is left out, kept in the file and reported as damage."""
        try:
            rows = [_row(t) for t in self._r.execute(sql, params).fetchall()]
        except sqlite3.Error as exc:
            kind = classify_error(exc, self.free_bytes())
            self._set_fault(kind, f"cannot read: {exc}")
            if kind == FAULT_DAMAGED:
                raise OutboxDamagedError(damaged_message(self._path, str(exc))) from exc
            raise PublishError(f"outbox {self._path}: cannot read: {exc}") from exc
        good: list[OutboxRow] = []
        for r in rows:
            if r.id in self._bad_rows:
                continue
            if r.crc is not None and zlib.crc32(r.payload) != r.crc:
                self._bad_rows.add(r.id)
                log.error(
                    "outbox_row_damaged", row=r.id, result_id=r.message_id, path=str(self._path)
                )
                self._set_fault(FAULT_DAMAGED, f"row {r.id} fails its checksum")
                continue
            good.append(r)
        return good

    def pending(self, after_id: int = 0, limit: int = 100) -> list[OutboxRow]:
        """Up to ``limit`` stored rows with ``id > after_id``, oldest first (rows that fail
        their checksum are left out). Raises ``PublishError`` when the file cannot be read.

        A reader that has caught up (``after_id`` at or past the rows read from the file) gets
        the rows stored since from memory, the same rows the file holds; rows up to
        ``after_id`` are then forgotten there: ``after_id`` only grows for such a reader.
        """
        with self._fresh_lock:
            if after_id >= self._fresh_after:
                fresh = self._fresh
                while fresh and fresh[0].id <= after_id:
                    fresh.popleft()
                self._fresh_after = after_id
                return [fresh[i] for i in range(min(limit, len(fresh)))]
        with self._rlock:
            return self._read(
                f"SELECT {_COLUMNS} FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            )

    def get(self, ids: Sequence[int]) -> list[OutboxRow]:
        """The rows among ``ids`` that are still stored, in id order."""
        out: list[OutboxRow] = []
        with self._rlock:
            for chunk in _chunks(list(ids)):
                out.extend(
                    self._read(
                        f"SELECT {_COLUMNS} FROM outbox WHERE id IN"
                        f" ({','.join('?' * len(chunk))}) ORDER BY id",
                        tuple(chunk),
                    )
                )
        out.sort(key=lambda r: r.id)
        return out

    def ack(self, ids: Sequence[int]) -> int:
        """Remove acknowledged rows; returns how many were still stored.

        Raises ``PublishError`` when they cannot be removed (nothing is removed then; the
        caller keeps the ids and tries again).
        """
        if not ids:
            return 0
        with self._wlock, self._rlock:
            if self._closed:
                return 0
            removed = self._transaction(
                self._r,
                lambda conn: _delete(conn, list(ids)),
                "remove acknowledged rows",
                shrinks=True,
            )
            self._depth -= removed
            self._acked += removed
            self._bad_rows.difference_update(ids)
        with self._fresh_lock:
            if max(ids) > self._fresh_after:  # acknowledged before it was read: not pending
                gone = set(ids)
                self._fresh = deque(r for r in self._fresh if r.id not in gone)
        return removed

    def maintain(self) -> None:
        """Expire droppable rows older than ``max_age_s``, checkpoint the WAL (every
        ``checkpoint_interval_s``, when it outgrows ``wal_max_bytes``, and again after a failed
        checkpoint) and take the disk reserve again when there is room.

        Called about once a second by the publisher thread. Raises ``PublishError`` when the
        expiry cannot be written (rolled back; tried again on the next call).
        """
        cutoff = self._clock() - self._config.max_age_s
        with self._wlock, self._rlock:
            if self._closed:
                return
            now = time.monotonic()
            if (
                self._checkpoint_due
                or now - self._last_checkpoint >= self._config.checkpoint_interval_s
                or self._wal_bytes() > self._config.wal_max_bytes // 2
            ):
                self._checkpoint(self._r, "TRUNCATE")
            if not self._reserve_held and self._config.reserve_bytes > 0:
                self._vacuum()
                if self._take_reserve():
                    log.info("outbox_reserve_restored", path=str(self._path))
            try:
                old = self._r.execute(
                    "SELECT id, priority, kind, message_id, created FROM outbox"
                    " WHERE priority = ? ORDER BY id LIMIT 1000",
                    (PRIORITY_DROP_FIRST,),
                ).fetchall()
            except sqlite3.Error as exc:
                kind = classify_error(exc, self.free_bytes())
                self._set_fault(kind, f"cannot read: {exc}")
                raise PublishError(f"outbox {self._path}: cannot read: {exc}") from exc
            expired = [(int(r[0]), int(r[1]), str(r[2]), r[3]) for r in old if r[4] < cutoff]
            if expired:
                self._transaction(
                    self._r,
                    lambda conn: _delete(conn, [e[0] for e in expired]),
                    "expire rows",
                    shrinks=True,
                )
                self._depth -= len(expired)
                self._count_drops(expired, expired=True)
                with self._fresh_lock:
                    self._forget_fresh()

    def take_drops(self) -> DropSummary | None:
        """Drops since the previous call (None when there were none)."""
        with self._wlock:
            if not self._pending.rows:
                return None
            pending, self._pending = self._pending, _DropTally()
            keep_ids, self._pending_keep_ids = self._pending_keep_ids, []
            return DropSummary(pending.rows, pending.keep_rows, pending.expired, tuple(keep_ids))

    # -- state -----------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Rows stored (not yet acknowledged)."""
        return self._depth

    def oldest_age_s(self, kinds: Sequence[str] | None = None) -> float | None:
        """Seconds since the oldest stored row was put (None when empty or unreadable).

        ``kinds`` limits it to rows of those kinds, e.g. ``("result", "reject")`` for the age
        of the oldest unacknowledged result.
        """
        params: tuple[str, ...] = ()
        if kinds is None:
            sql = "SELECT created FROM outbox ORDER BY id LIMIT 1"
        else:
            marks = ",".join("?" * len(kinds))
            sql = f"SELECT created FROM outbox WHERE kind IN ({marks}) ORDER BY id LIMIT 1"
            params = tuple(kinds)
        with self._rlock:
            if self._closed:
                return None
            try:
                row = self._r.execute(sql, params).fetchone()
            except sqlite3.Error:
                return None
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
            dropped=self._drops.rows,
            dropped_keep=self._drops.keep_rows,
            expired=self._drops.expired,
            near_bound=self._near,
            near_bound_warnings=self._near_warnings,
            fault=self._fault,
            reserve_held=self._reserve_held,
            reserve_releases=self._reserve_releases,
            checkpoint_failures=self._checkpoint_failures,
            free_bytes=self.free_bytes(),
        )

    def close(self) -> None:
        """Checkpoint (so the file alone holds every row), close the database and release
        the lock file (idempotent). The reserve file stays for the next start."""
        with self._wlock, self._rlock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(sqlite3.Error):
                self._r.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._w.close()
            self._r.close()
        self._release_lock_file()
        log.info("outbox_closed", path=str(self._path), depth=self._depth)

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _delete(conn: sqlite3.Connection, ids: Sequence[int]) -> int:
    removed = 0
    for chunk in _chunks(ids):
        cur = conn.execute(
            f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(chunk))})", tuple(chunk)
        )
        removed += cur.rowcount
    return removed
