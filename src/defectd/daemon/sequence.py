"""Frame numbers (``seq``) that continue across restarts, per camera, kept in the state dir.

Subscribers order a camera's results by ``seq`` (docs/mqtt.md); a restart that began again at
0 would make new parts look older than the ones before. ``<state_dir>/sequence.json`` holds,
per camera, the first number the next start may use. Writing it for every frame would cost a
file write per part, so numbers are *reserved* in blocks: at start (and whenever a camera
reaches the end of its block) the file is advanced ``reserve`` numbers ahead, atomically, before
those numbers are used. A clean stop writes the exact next number, so a restart continues
without a gap; after a crash (SIGKILL, power cut) the next start continues after the reserved
block, so numbers jump ahead but never repeat.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from defectd.errors import ConfigError
from defectd.log import get_logger

log = get_logger(__name__)

FILE_NAME = "sequence.json"
DEFAULT_RESERVE = 10_000


class SequenceStore:
    """Per-camera frame numbering that survives restarts; thread-safe (camera threads call
    :meth:`used`). Raises ``ConfigError`` naming the file when it cannot be read or written."""

    def __init__(self, state_dir: Path, *, reserve: int = DEFAULT_RESERVE) -> None:
        self.path = state_dir / FILE_NAME
        self._reserve = reserve
        self._lock = threading.Lock()
        self._next: dict[str, int] = self._read()
        self._reserved: dict[str, int] = dict(self._next)

    def _read(self) -> dict[str, int]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.path}: cannot read the frame numbers: {exc}") from None
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and type(v) is int and v >= 0 for k, v in data.items()
        ):
            raise ConfigError(f"{self.path}: expected {{camera: next seq (int >= 0)}}")
        return dict(data)

    def _write(self, values: dict[str, int]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(values, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot write the frame numbers: {exc}") from None

    def start(self, camera: str) -> int:
        """The first number for ``camera`` this run; reserves a block ahead of it on disk."""
        with self._lock:
            first = self._next.get(camera, 0)
            self._next[camera] = first
            self._reserved[camera] = first + self._reserve
            self._write(self._reserved)
        return first

    def used(self, camera: str, seq: int) -> None:
        """Note that ``seq`` was given to a frame; reserves the next block when it is needed."""
        with self._lock:
            self._next[camera] = max(self._next.get(camera, 0), seq + 1)
            if self._next[camera] < self._reserved.get(camera, 0):
                return
            self._reserved[camera] = self._next[camera] + self._reserve
            try:
                self._write(self._reserved)
            except ConfigError as exc:  # numbering goes on; a crash may then repeat numbers
                log.error("sequence_not_saved", camera=camera, error=str(exc))

    def close(self) -> None:
        """Write the exact next numbers (a clean stop): the next start continues without a gap."""
        with self._lock:
            self._reserved = dict(self._next)
            try:
                self._write(self._next)
            except ConfigError as exc:
                log.error("sequence_not_saved", error=str(exc))
