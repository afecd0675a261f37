"""Shadow mode's record: one SQLite file, and the report ``defectd shadow report`` prints.

``<state_dir>/shadow/shadow.sqlite`` (WAL) holds three tables:

- ``runs``: one row per daemon start with a candidate: station, candidate name, sha256, path and
  engine, the live model at start, start and stop times (UTC epoch seconds).
- ``parts``: one row per part the candidate inspected: time of grab, camera, seq, part id, the
  live and the shadow verdict (``pass``/``fail``/``error``), the pixel IoU of the two masks, the
  truth when the frame carried it, the part's class, the live model's sha256 and name, and the
  folder of an archived disagreement.
- ``counts``: frames the candidate never saw, counted per camera and reason (``skipped``: its
  queue was full; ``live_error``: the live verdict was ``error``, so there is nothing to
  compare), flushed every second or so.

``shadow_report(state_dir)`` summarises the latest candidate against the live model it ran
beside; its JSON is the contract ``defectd promote`` reads (docs/lifecycle.md, "Shadow mode").
Imports no inference runtime.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from defectd.daemon.shadow.config import shadow_dir
from defectd.errors import ConfigError

REPORT_SCHEMA_VERSION = 1
VERDICTS = ("pass", "fail")
CONFUSION_KEYS = tuple(f"{live}/{shadow}" for live in VERDICTS for shadow in VERDICTS)
SKIPPED = "skipped"
LIVE_ERROR = "live_error"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    station TEXT NOT NULL,
    started REAL NOT NULL,
    stopped REAL,
    live_sha256 TEXT NOT NULL,
    live_name TEXT NOT NULL,
    candidate_sha256 TEXT NOT NULL,
    candidate_name TEXT NOT NULL,
    candidate_path TEXT NOT NULL,
    candidate_engine TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS parts (
    id INTEGER PRIMARY KEY,
    run INTEGER NOT NULL REFERENCES runs(id),
    t REAL NOT NULL,
    camera TEXT NOT NULL,
    seq INTEGER NOT NULL,
    part_id TEXT,
    live TEXT NOT NULL,
    shadow TEXT NOT NULL,
    iou REAL,
    truth TEXT,
    cls TEXT NOT NULL,
    live_sha256 TEXT NOT NULL,
    live_name TEXT NOT NULL,
    archive TEXT
);
CREATE INDEX IF NOT EXISTS parts_run ON parts(run);
CREATE TABLE IF NOT EXISTS counts (
    run INTEGER NOT NULL REFERENCES runs(id),
    t REAL NOT NULL,
    camera TEXT NOT NULL,
    reason TEXT NOT NULL,
    live_sha256 TEXT NOT NULL,
    n INTEGER NOT NULL
);
"""


def store_path(state_dir: Path) -> Path:
    return shadow_dir(state_dir) / "shadow.sqlite"


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A model as the record names it: card name, sha256 of the executed file, path, engine."""

    name: str
    sha256: str
    path: str = ""
    engine: str = ""


@dataclass(frozen=True, slots=True)
class PartRecord:
    """One compared part (verdicts ``pass``/``fail``/``error``; ``iou`` None when a side has
    no mask; ``truth`` ``pass``/``fail`` when the frame carried it)."""

    t: float
    camera: str
    seq: int
    part_id: str | None
    live: str
    shadow: str
    iou: float | None
    truth: str | None
    cls: str
    live_model: ModelRef
    archive: str | None


class ShadowStore:
    """The writer of one daemon run's record; thread-safe (one connection under a lock).

    Raises ``ConfigError`` naming the file when it cannot be created or opened.
    """

    def __init__(self, state_dir: Path) -> None:
        path = self.path = store_path(state_dir)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"shadow: cannot open its record {path}: {exc}") from None
        self._lock = threading.Lock()
        self.run: int | None = None

    def start_run(self, station: str, t: float, live: ModelRef, candidate: ModelRef) -> int:
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO runs (station, started, live_sha256, live_name, candidate_sha256, "
                "candidate_name, candidate_path, candidate_engine) VALUES (?,?,?,?,?,?,?,?)",
                (
                    station,
                    t,
                    live.sha256,
                    live.name,
                    candidate.sha256,
                    candidate.name,
                    candidate.path,
                    candidate.engine,
                ),
            )
            self.run = int(cur.lastrowid or 0)
        return self.run

    def add_part(self, p: PartRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO parts (run, t, camera, seq, part_id, live, shadow, iou, truth, cls, "
                "live_sha256, live_name, archive) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    self.run,
                    p.t,
                    p.camera,
                    p.seq,
                    p.part_id,
                    p.live,
                    p.shadow,
                    p.iou,
                    p.truth,
                    p.cls,
                    p.live_model.sha256,
                    p.live_model.name,
                    p.archive,
                ),
            )

    def add_counts(self, t: float, counts: Iterable[tuple[str, str, str, int]]) -> None:
        """``(camera, reason, live_sha256, n)`` rows: frames the candidate did not inspect."""
        rows = [(self.run, t, cam, reason, sha, n) for cam, reason, sha, n in counts if n]
        if not rows:
            return
        with self._lock:
            self._db.executemany(
                "INSERT INTO counts (run, t, camera, reason, live_sha256, n) VALUES (?,?,?,?,?,?)",
                rows,
            )

    def close(self, t: float) -> None:
        with self._lock:
            if self.run is not None:
                self._db.execute("UPDATE runs SET stopped = ? WHERE id = ?", (t, self.run))
            self._db.close()


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    text = datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def shadow_report(state_dir: Path) -> dict[str, Any]:
    """The summary of the latest candidate against the live model it ran beside (the JSON
    contract in docs/lifecycle.md). Parts of earlier candidates, or compared with another live
    model (before a reload), are left out.

    Raises ``ConfigError`` when the state directory holds no shadow record.
    """
    path = store_path(state_dir)
    if not path.is_file():
        raise ConfigError(
            f"{state_dir}: no shadow record ({path} not found); run the daemon with a [shadow] "
            "section first"
        )
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise ConfigError(f"{path}: cannot open the shadow record: {exc}") from None
    try:
        return _report(db, state_dir)
    except sqlite3.Error as exc:
        raise ConfigError(f"{path}: cannot read the shadow record: {exc}") from None
    finally:
        db.close()


def _report(db: sqlite3.Connection, state_dir: Path) -> dict[str, Any]:
    last = db.execute(
        "SELECT station, candidate_sha256, candidate_name, candidate_path, candidate_engine, "
        "live_sha256, live_name FROM runs ORDER BY id DESC LIMIT 1"
    ).fetchone()
    if last is None:
        raise ConfigError(f"{state_dir}: the shadow record holds no run yet")
    station, cand_sha, cand_name, cand_path, cand_engine, live_sha, live_name = last
    runs = [r[0] for r in db.execute("SELECT id FROM runs WHERE candidate_sha256 = ?", (cand_sha,))]
    marks = ",".join("?" * len(runs))
    # The live model the candidate was last compared with (a reload may have changed it).
    latest = db.execute(
        f"SELECT live_sha256, live_name FROM parts WHERE run IN ({marks}) ORDER BY id DESC LIMIT 1",
        runs,
    ).fetchone()
    if latest is not None:
        live_sha, live_name = latest
    rows = db.execute(
        f"SELECT t, camera, seq, part_id, live, shadow, iou, truth, cls, archive FROM parts "
        f"WHERE run IN ({marks}) AND live_sha256 = ? ORDER BY t, id",
        (*runs, live_sha),
    ).fetchall()
    counts = dict(
        db.execute(
            f"SELECT reason, SUM(n) FROM counts WHERE run IN ({marks}) AND live_sha256 = ? "
            "GROUP BY reason",
            (*runs, live_sha),
        ).fetchall()
    )
    span = db.execute(
        f"SELECT MIN(t), MAX(t) FROM counts WHERE run IN ({marks}) AND live_sha256 = ?",
        (*runs, live_sha),
    ).fetchone()

    confusion = dict.fromkeys(CONFUSION_KEYS, 0)
    per_class: dict[str, dict[str, int]] = {}
    per_camera: dict[str, dict[str, int]] = {}
    disagreements: list[dict[str, Any]] = []
    ious: list[float] = []
    shadow_errors = 0
    times = [t for t in (span or ()) if t is not None]
    for t, camera, seq, part_id, live, shadow, iou, truth, cls, archive in rows:
        times.append(t)
        if shadow not in VERDICTS or live not in VERDICTS:
            shadow_errors += 1
            continue
        confusion[f"{live}/{shadow}"] += 1
        if iou is not None:
            ious.append(float(iou))
        agree = live == shadow
        # A part with defects of two kinds counts under both.
        for table, keys in ((per_class, cls.split(",")), (per_camera, [camera])):
            for key in keys:
                entry = table.setdefault(key, {"parts": 0, "disagreements": 0})
                entry["parts"] += 1
                entry["disagreements"] += 0 if agree else 1
        if not agree:
            disagreements.append(
                {
                    "seq": seq,
                    "part_id": part_id,
                    "camera": camera,
                    "live": live,
                    "shadow": shadow,
                    "iou": iou,
                    "truth": truth,
                    "t": _iso(t),
                    "archive": archive,
                }
            )
    parts = sum(confusion.values())
    agreeing = confusion["pass/pass"] + confusion["fail/fail"]
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "kind": "shadow_report",
        "station": station,
        "state_dir": str(state_dir),
        "live": {"sha256": live_sha, "name": live_name},
        "candidate": {
            "sha256": cand_sha,
            "name": cand_name,
            "path": cand_path,
            "engine": cand_engine,
        },
        "parts": parts,
        "skipped": int(counts.get(SKIPPED, 0)),
        "errors": {"live": int(counts.get(LIVE_ERROR, 0)), "shadow": shadow_errors},
        "agreement": round(agreeing / parts, 6) if parts else None,
        "confusion": confusion,
        "iou": (
            {"mean": round(sum(ious) / len(ious), 6), "min": round(min(ious), 6)} if ious else None
        ),
        "per_class": dict(sorted(per_class.items())),
        "per_camera": dict(sorted(per_camera.items())),
        "disagreements": disagreements,
        "since": _iso(min(times)) if times else None,
        "until": _iso(max(times)) if times else None,
    }


__all__ = [
    "CONFUSION_KEYS",
    "LIVE_ERROR",
    "REPORT_SCHEMA_VERSION",
    "SKIPPED",
    "ModelRef",
    "PartRecord",
    "ShadowStore",
    "shadow_report",
    "store_path",
]
