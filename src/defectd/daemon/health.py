"""HTTP endpoints for orchestration and monitoring: ``/healthz`` (JSON) and ``/metrics``.

A stdlib ``ThreadingHTTPServer`` on a named thread: scrapes are rare and small, and keeping it
off the inspection threads means a slow scraper can never delay a verdict.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from defectd.daemon.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from defectd.errors import ConfigError
from defectd.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class HealthReport:
    """``live``: the process works (threads answer). ``ready``: it inspects and publishes.

    ``reasons`` lists, in words, every check that keeps it from being ready; ``checks`` holds
    the details per component (cameras, engine, broker, outbox, last progress age).
    """

    live: bool
    ready: bool
    reasons: tuple[str, ...] = ()
    checks: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        return d


def parse_address(address: str, key: str = "health.address") -> tuple[str, int]:
    """``"127.0.0.1:9464"``, ``"[::1]:9464"`` or ``":9464"`` (all interfaces) -> (host, port)."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"{key}: {address!r} is not HOST:PORT (e.g. 127.0.0.1:9464)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port_text)  # ":PORT": every interface


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        report: Callable[[], HealthReport],
        metrics: Callable[[], str],
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.report = report
        self.metrics = metrics
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "defectd"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path in ("/healthz", "/health"):
                report = self.server.report()
                status = HTTPStatus.OK if report.ready else HTTPStatus.SERVICE_UNAVAILABLE
                body = json.dumps(report.to_dict(), default=str).encode()
                self._send(status, "application/json", body)
            elif path == "/livez":
                report = self.server.report()
                status = HTTPStatus.OK if report.live else HTTPStatus.SERVICE_UNAVAILABLE
                self._send(status, "application/json", json.dumps({"live": report.live}).encode())
            elif path == "/metrics":
                self._send(HTTPStatus.OK, METRICS_CONTENT_TYPE, self.server.metrics().encode())
            else:
                self._send(HTTPStatus.NOT_FOUND, "text/plain", b"try /healthz or /metrics\n")
        except Exception as exc:  # answer 500 rather than drop the connection
            log.warning("health_request_failed", path=path, error=repr(exc))
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain", b"internal error\n")

    def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("health_request", request=format % args)


class HealthServer:
    """Serves ``/healthz`` (200 ready, 503 not) and ``/metrics`` until ``stop()``.

    Port 0 binds a free port; ``address`` then tells which. Raises ``ConfigError`` naming the
    address when it cannot be bound.
    """

    def __init__(
        self,
        address: str,
        report: Callable[[], HealthReport],
        metrics: Callable[[], str],
    ) -> None:
        host, port = parse_address(address)
        try:
            self._server = _Server((host, port), report, metrics)
        except OSError as exc:
            raise ConfigError(f"health.address: cannot listen on {address}: {exc}") from exc
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="health-http",
            daemon=True,
        )
        self._thread.start()
        host, port = self.address
        log.info("health_listening", url=f"http://{host}:{port}/healthz")

    def stop(self, timeout: float = 2.0) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout)
            self._thread = None
        self._server.server_close()
