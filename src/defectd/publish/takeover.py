"""Telling a client-id clash from an ordinary lost connection.

A broker keeps one session per client id: when a second client connects with the id of a
connected one, the first is disconnected (MQTT 5 reason code 0x8E "Session taken over", where
the broker and client report it; Mosquitto 2.0 with paho shows only "Unspecified error"). Two
stations configured with the same station id (so the same default ``defectd-<station>``) or
the same ``mqtt.client_id`` then reconnect and knock each other off about once a second, and
each only sees "connection lost". :class:`TakeoverDetector` recognises the reason code, or else
the pattern: ``repeats`` disconnects in a row, each within ``window_s`` of a successful connect.
A connection that lasts longer than ``window_s`` ends the streak.
"""

from __future__ import annotations

from dataclasses import dataclass

SESSION_TAKEN_OVER = 0x8E  # MQTT 5 DISCONNECT reason code
DEFAULT_WINDOW_S = 5.0
DEFAULT_REPEATS = 3


@dataclass
class TakeoverDetector:
    """Feed it every successful connect and every loss of an established connection (times
    in seconds, monotonic). Single-threaded: the publisher thread owns it."""

    window_s: float = DEFAULT_WINDOW_S
    repeats: int = DEFAULT_REPEATS
    clashes: int = 0  # disconnects attributed to a clash, for metrics
    active: bool = False  # in a clash streak now (reported once per streak)
    _up_since: float | None = None
    _quick_drops: int = 0

    def connected(self, now: float) -> None:
        self._up_since = now

    def settled(self, now: float) -> None:
        """End the streak once the current connection has lasted ``window_s``."""
        if self._up_since is not None and now - self._up_since >= self.window_s:
            self._quick_drops = 0
            self.active = False

    def disconnected(self, reason_code: int | None, now: float) -> str | None:
        """The evidence, when this disconnect starts a clash streak (report it); else None."""
        uptime = None if self._up_since is None else now - self._up_since
        self._up_since = None
        if reason_code == SESSION_TAKEN_OVER:
            evidence = "the broker reports the session taken over by another client"
        elif uptime is not None and uptime < self.window_s:
            self._quick_drops += 1
            if self._quick_drops < self.repeats:
                return None
            evidence = (
                f"{self._quick_drops} disconnects in a row, each within {self.window_s:g} s "
                "of connecting"
            )
        else:
            self._quick_drops = 0
            self.active = False
            return None
        self.clashes += 1
        if self.active:
            return None
        self.active = True
        return evidence
