"""A local Mosquitto broker process on a free port: for tests, benchmarks and site checks.

Persistence is on by default and saved every second, and the per-client queue is unbounded,
so a broker that is SIGKILLed and restarted keeps subscriptions and queued messages as a
production broker should (Mosquitto acknowledges a QoS 1 message before it saves it: what
arrived after the last save is gone after a SIGKILL unless it was already delivered; see
``wait_saved``).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from defectd.errors import PublishError

_CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str | None:
    """Path of the ``mosquitto`` binary, or None when it is not installed."""
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """One broker process in ``workdir`` (config, persistence file, log).

    ``listener_conf`` lines apply to the listener (TLS files ...), ``extra_conf`` lines are
    global (``password_file``, ``acl_file`` ...). The port stays the same across restarts.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        persistence: bool = True,
        allow_anonymous: bool = True,
        listener_conf: str = "",
        extra_conf: str = "",
        binary: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.persistence = persistence
        self.allow_anonymous = allow_anonymous
        self.listener_conf = listener_conf
        self.extra_conf = extra_conf
        found = binary or find_mosquitto()
        if found is None:
            raise PublishError("mosquitto is not installed (looked for: mosquitto, /usr/sbin)")
        self.binary = found
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def conf_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _write_conf(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} {self.host}",
            self.listener_conf,
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "autosave_interval 1",
            "max_queued_messages 0",
            "max_inflight_messages 100",
            # Without it a PUBACK can sit in Nagle's buffer until the next PUBLISH arrives:
            # acknowledgement latency then follows the part rate (5 ms at 200 parts/s).
            "set_tcp_nodelay true",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            # Mosquitto drops root privileges to a 'mosquitto' user unless told to stay.
            f"user {getpass.getuser()}",
            self.extra_conf,
        ]
        self.conf_path.write_text("\n".join(line for line in lines if line) + "\n")

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the broker and wait until it accepts TCP connections.

        Raises ``PublishError`` with the tail of its log when it exits or does not listen.
        """
        if self.running:
            return
        self._write_conf()
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.5),
            ):
                return
            time.sleep(0.02)
        tail = self.log_tail()
        self.kill()
        raise PublishError(f"mosquitto on {self.host}:{self.port} did not start: {tail}")

    def kill(self) -> None:
        """SIGKILL the broker (what a crash or power cut does to it) and reap it."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM the broker (it saves its persistence file) and reap it."""
        self._signal(signal.SIGTERM)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _signal(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def saves(self) -> int:
        """How many times the broker has saved its persistence file (from its log)."""
        try:
            return self.log_path.read_text(errors="replace").count("Saving in-memory database")
        except OSError:
            return 0

    def wait_saved(self, timeout_s: float = 5.0) -> bool:
        """Wait for the next save of the persistence file (Mosquitto saves every ~2 s with
        ``autosave_interval 1``): state created before the call then survives a SIGKILL."""
        before = self.saves()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.saves() > before:
                return True
            time.sleep(0.05)
        return False

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:])

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
