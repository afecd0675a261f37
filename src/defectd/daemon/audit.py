"""The audit log: an append-only record of every change of what decides a verdict.

One JSON object per line (``<state_dir>/audit.jsonl`` by default, ``[audit] path``)::

    {"seq": 3, "time": "2026-01-02T10:00:00.123Z", "action": "promote", "station": "line1",
     "user": "alice", "reason": "...", "old": {"model": "...", "sha256": "...",
     "config_hash": "..."}, "new": {...}, "evidence": {"path": "...", "sha256": "...",
     "stored": "evidence/<sha256>.json"} | null, "details": {...},
     "prev": "<hash of entry 2>", "hash": "<sha256 of this entry without 'hash'>"}

Who writes it: the daemon at start (only when the model or the decision settings differ from
the last entry: a change made while it was stopped) and at every reload that changes the model
sha256 or the ``config_hash`` (which covers thresholds, rules, calibration files); ``defectd
promote`` for every promotion and every refused attempt.

Why it can be trusted: the file is only ever opened with ``O_APPEND`` (under an exclusive
``flock``, so a daemon and a ``promote`` appending at once keep the chain whole); each entry
holds the hash of the one before it (``prev``) and its own (``hash``, sha256 over its canonical
JSON). Changing, removing or reordering an entry breaks the chain at that line, which
``defectd audit --verify`` reports. Cutting entries off the end leaves a valid shorter chain:
keep the head hash ``--verify`` prints somewhere else (a ticket, the line's MES) to catch that.
Evidence files are copied beside the log under ``evidence/`` named by their sha256, so the
proof stays even when the original is deleted.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from defectd.errors import ConfigError, DataError
from defectd.model.card import file_sha256

AUDIT_SCHEMA_VERSION = 1
GENESIS = "0" * 64  # ``prev`` of the first entry
_TAIL_CHUNK = 64 * 1024


class AuditConfig(BaseModel):
    """``[audit]``: where the audit log is kept."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path = Field(
        default=Path("audit.jsonl"), description="relative paths are under the state directory"
    )


@dataclass(frozen=True, slots=True)
class ModelState:
    """What decides a verdict at one moment: the model (name, sha256) and the ``config_hash``."""

    model: str
    sha256: str
    config_hash: str

    def as_dict(self) -> dict[str, str]:
        return {"model": self.model, "sha256": self.sha256, "config_hash": self.config_hash}

    @classmethod
    def from_dict(cls, data: Any) -> ModelState | None:
        if not isinstance(data, dict):
            return None
        fields = (str(data.get(k, "")) for k in ("model", "sha256", "config_hash"))
        return cls(*fields)


@dataclass
class Verification:
    """What ``verify`` found: entries read, problems (``line N: ...``), the last good hash."""

    entries: int = 0
    head: str = GENESIS
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "head": self.head,
            "problems": self.problems,
        }


def current_user() -> str:
    """The OS user running this process (``uid:N`` when it has no name)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def entry_hash(entry: dict[str, Any]) -> str:
    """sha256 (hex) of the entry's canonical JSON without its ``hash`` key."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _now() -> str:
    when = datetime.now(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S") + f".{when.microsecond // 1000:03d}Z"


def _last_line(fd: int) -> tuple[bytes, bool]:
    """The last complete line of the open file (without its newline) and whether the file
    ends with a newline (False: a torn write left part of a line at the end)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return b"", True
    ends = os.pread(fd, 1, size - 1) == b"\n"
    pos, tail = size, b""
    while pos > 0:
        step = min(_TAIL_CHUNK, pos)
        pos -= step
        tail = os.pread(fd, step, pos) + tail
        # What follows the last newline is b"" or a torn line; the first piece may be cut.
        complete = tail.split(b"\n")[:-1]
        usable = [line for line in (complete if pos == 0 else complete[1:]) if line.strip()]
        if usable:
            return usable[-1], ends
    return b"", ends


class AuditLog:
    """Appends to and reads one audit log file; see the module docstring.

    ``append`` raises ``ConfigError`` naming the file when it cannot be written (a missing
    folder is created).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def evidence_dir(self) -> Path:
        return self.path.parent / "evidence"

    def append(
        self,
        action: str,
        *,
        station: str,
        reason: str,
        user: str | None = None,
        old: ModelState | None = None,
        new: ModelState | None = None,
        evidence: Path | None = None,
        details: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Append one entry and return it (with ``seq``, ``prev`` and ``hash``).

        ``evidence`` (a file) is hashed and copied to ``evidence/<sha256><suffix>``;
        ``DataError`` naming it when it cannot be read.
        """
        stored_evidence: dict[str, str] | None = None
        if evidence is not None:
            stored_evidence = self._store_evidence(Path(evidence))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise ConfigError(f"audit.path: cannot open {self.path} for appending: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # O_WRONLY files cannot be read: read the tail through a second descriptor.
            rfd = os.open(self.path, os.O_RDONLY)
            try:
                last, ends = _last_line(rfd)
            finally:
                os.close(rfd)
            prev, seq = GENESIS, 1
            if last:
                try:
                    before = json.loads(last)
                    prev, seq = str(before["hash"]), int(before["seq"]) + 1
                except (ValueError, KeyError, TypeError):
                    # A damaged last line: chain to its bytes so the break stays visible.
                    prev = hashlib.sha256(last).hexdigest()
            entry: dict[str, Any] = {
                "schema_version": AUDIT_SCHEMA_VERSION,
                "seq": seq,
                "time": _now(),
                "action": action,
                "station": station,
                "user": user or current_user(),
                "reason": reason,
                "old": None if old is None else old.as_dict(),
                "new": None if new is None else new.as_dict(),
                "evidence": stored_evidence,
                "details": details or {},
                "prev": prev,
            }
            entry["hash"] = entry_hash(entry)
            line = json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n"
            data = (b"" if ends else b"\n") + line.encode()
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"short write ({written} of {len(data)} bytes)")
            os.fsync(fd)
        except OSError as exc:
            raise ConfigError(f"audit.path: cannot append to {self.path}: {exc}") from exc
        finally:
            os.close(fd)  # releases the lock
        return entry

    def _store_evidence(self, path: Path) -> dict[str, str]:
        if not path.is_file():
            raise DataError(f"{path}: evidence file not found")
        try:
            digest = file_sha256(path)
            self.evidence_dir.mkdir(parents=True, exist_ok=True)
            stored = self.evidence_dir / f"{digest}{path.suffix}"
            if not stored.exists():
                tmp = stored.with_name(stored.name + ".tmp")
                shutil.copyfile(path, tmp)
                tmp.replace(stored)
        except OSError as exc:
            raise DataError(f"{path}: cannot keep the evidence file: {exc}") from exc
        return {
            "path": str(path.resolve()),
            "sha256": digest,
            "stored": stored.relative_to(self.path.parent).as_posix(),
        }

    def entries(self) -> list[dict[str, Any]]:
        """Every entry that parses, in file order (``[]`` when there is no log yet)."""
        out: list[dict[str, Any]] = []
        for _, raw in self._lines():
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if isinstance(entry, dict):
                out.append(entry)
        return out

    def last_state(self, station: str) -> ModelState | None:
        """What the daemon of ``station`` last recorded running: the ``new`` state of its last
        ``start`` or ``reload`` entry (a ``promote`` takes effect at the reload that follows)."""
        for entry in reversed(self.entries()):
            installed = entry.get("action") in ("start", "reload")
            if installed and entry.get("station") == station and entry.get("new") is not None:
                return ModelState.from_dict(entry["new"])
        return None

    def _lines(self) -> list[tuple[int, bytes]]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read the audit log: {exc}") from exc
        return [(i, line) for i, line in enumerate(data.split(b"\n"), start=1) if line.strip()]

    def verify(self) -> Verification:
        """Check every line: valid JSON, its own hash, the previous entry's hash, ``seq``
        counting up by one. A missing log is a ``DataError`` (nothing to verify)."""
        if not self.path.exists():
            raise DataError(f"{self.path}: audit log not found")
        result = Verification()
        prev, seq = GENESIS, 0
        for number, raw in self._lines():
            where = f"line {number}"
            try:
                entry = json.loads(raw)
            except ValueError:
                result.problems.append(f"{where}: not valid JSON (a torn or edited line)")
                prev = hashlib.sha256(raw).hexdigest()
                continue
            if not isinstance(entry, dict):
                result.problems.append(f"{where}: not a JSON object")
                continue
            result.entries += 1
            stored = entry.get("hash")
            if stored != entry_hash(entry):
                result.problems.append(f"{where}: hash does not match the entry (it was changed)")
            if entry.get("prev") != prev:
                result.problems.append(
                    f"{where}: prev does not name the entry before it (an entry was removed, "
                    "inserted or changed before this line)"
                )
            if entry.get("seq") != seq + 1:
                result.problems.append(f"{where}: seq {entry.get('seq')} after {seq}")
            number_in = entry.get("seq")
            seq = number_in if isinstance(number_in, int) else seq + 1
            prev = str(stored)
            evidence = entry.get("evidence")
            if isinstance(evidence, dict) and evidence.get("stored"):
                copy = self.path.parent / str(evidence["stored"])
                if not copy.is_file():
                    result.problems.append(f"{where}: evidence copy {copy} is missing")
                elif file_sha256(copy) != evidence.get("sha256"):
                    result.problems.append(f"{where}: evidence copy {copy} was changed")
        result.head = prev
        return result


__all__ = [
    "AUDIT_SCHEMA_VERSION",
    "AuditConfig",
    "AuditLog",
    "ModelState",
    "Verification",
    "current_user",
    "entry_hash",
]
