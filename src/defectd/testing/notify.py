"""``NotifySocket``: a datagram socket standing in for systemd's notify socket.

The daemon under test gets its path as ``NOTIFY_SOCKET``; a thread records every line it sends
(``READY=1``, ``WATCHDOG=1``, ``STATUS=...``) with the monotonic time it arrived.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from pathlib import Path


class NotifySocket:
    """Binds ``path`` and records ``(monotonic time, line)`` for each line received in
    ``lines`` until ``close``. The owner closes it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[tuple[float, str]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-notify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            now = time.monotonic()
            self.lines.extend((now, line) for line in data.decode().splitlines())

    def pings(self) -> list[float]:
        """The times of every ``WATCHDOG=1`` so far."""
        return [when for when, line in list(self.lines) if line == "WATCHDOG=1"]

    def pings_since(self, t: float) -> int:
        """How many ``WATCHDOG=1`` arrived at or after ``t``."""
        return sum(1 for when in self.pings() if when >= t)

    def max_gap(self, t0: float, t1: float) -> float:
        """The longest stretch without a ping within [t0, t1], seconds."""
        times = [t0] + [t for t in self.pings() if t0 <= t <= t1] + [t1]
        return max(b - a for a, b in itertools.pairwise(times))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
