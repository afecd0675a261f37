"""A tiny ``sd_notify`` client: datagrams to ``$NOTIFY_SOCKET``, no dependency.

systemd passes the socket path in ``NOTIFY_SOCKET``; a leading ``@`` names a socket in the
abstract namespace (sent with a leading NUL byte). Without the variable every call is a no-op,
so the daemon runs the same way from a terminal. ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, when
set, must be our pid) says how often systemd wants ``WATCHDOG=1``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping

from defectd.log import get_logger

log = get_logger(__name__)


class SdNotifier:
    """Sends notifications to the service manager; safe to call from any thread.

    Send errors are logged once and otherwise ignored: losing a notification must never stop
    inspection (systemd will act on a missing watchdog ping by itself).
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        environ = os.environ if env is None else env
        raw = environ.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if raw.startswith("@"):
            self._address = b"\0" + raw[1:].encode()
        elif raw.startswith("/"):
            self._address = raw
        self._watchdog_usec = _watchdog_usec(environ)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when a service manager listens (``NOTIFY_SOCKET`` was set)."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Seconds between the deadlines systemd enforces, or ``None`` when no watchdog is set."""
        return None if self._watchdog_usec is None else self._watchdog_usec / 1e6

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; returns whether it was sent."""
        if self._address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode()
        with self._lock:
            try:
                if self._sock is None:
                    kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    self._sock = socket.socket(socket.AF_UNIX, kind)
                self._sock.sendto(payload, self._address)
            except OSError as exc:
                if not self._warned:
                    log.warning("sd_notify_failed", error=str(exc))
                    self._warned = True
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        lines = ["READY=1"] + ([f"STATUS={status}"] if status else [])
        return self.notify(*lines)

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match the reload; older
        # versions ignore the extra line.
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self, status: str | None = None) -> bool:
        lines = ["STOPPING=1"] + ([f"STATUS={_one_line(status)}"] if status else [])
        return self.notify(*lines)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None  # meant for another process (e.g. our parent)
    try:
        usec = int(raw)
    except ValueError:
        return None
    return usec if usec > 0 else None
