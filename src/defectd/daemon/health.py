"""The daemon's HTTP endpoint: ``/healthz`` and ``/livez`` (JSON), ``/metrics`` (Prometheus).

An ASGI app (Starlette) served by uvicorn on its own named thread with its own event loop, in
the daemon's process: probes and scrapes never run on an inspection thread, so a slow client
can never delay a verdict. Other parts (the operator view) add their routes to the same app.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from defectd.daemon.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from defectd.errors import ConfigError
from defectd.log import get_logger

log = get_logger(__name__)

START_TIMEOUT_S = 10.0


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


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address as bound) only accepts connections from this machine."""
    return host in ("localhost", "::1") or host.startswith("127.")


def _json(status: HTTPStatus, payload: Any) -> Response:
    body = json.dumps(payload, default=str).encode()
    return Response(body, status_code=status, headers=_headers("application/json"))


def _headers(content_type: str) -> dict[str, str]:
    return {"Content-Type": content_type, "Cache-Control": "no-store"}


def health_routes(
    report: Callable[[], HealthReport], metrics: Callable[[], str]
) -> list[BaseRoute]:
    """``/healthz`` (alias ``/health``): 200 ready, 503 not, with reasons; ``/livez``: 200
    while the process makes progress; ``/metrics``: the Prometheus text exposition.

    The handlers are plain functions: Starlette runs them on its worker threads, so a report
    that takes a lock never blocks the event loop.
    """

    def healthz(request: Request) -> Response:
        r = report()
        return _json(HTTPStatus.OK if r.ready else HTTPStatus.SERVICE_UNAVAILABLE, r.to_dict())

    def livez(request: Request) -> Response:
        r = report()
        return _json(HTTPStatus.OK if r.live else HTTPStatus.SERVICE_UNAVAILABLE, {"live": r.live})

    def scrape(request: Request) -> Response:
        return Response(metrics().encode(), headers=_headers(METRICS_CONTENT_TYPE))

    def guarded(endpoint: Callable[[Request], Response]) -> Callable[[Request], Response]:
        def handle(request: Request) -> Response:
            try:
                return endpoint(request)
            except Exception as exc:  # answer 500 and say why in the log, not to the client
                log.warning("health_request_failed", path=request.url.path, error=repr(exc))
                return PlainTextResponse("internal error\n", status_code=500)

        return handle

    return [
        Route("/healthz", guarded(healthz)),
        Route("/health", guarded(healthz)),
        Route("/livez", guarded(livez)),
        Route("/metrics", guarded(scrape)),
    ]


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class HealthServer:
    """Serves ``/healthz``, ``/livez``, ``/metrics`` and any ``routes`` given until ``stop()``.

    The socket is bound here, so port 0 gives a free port (``address`` then tells which) and a
    busy or bad address is a ``ConfigError`` naming it before anything starts. ``middleware``
    wraps the whole app (the operator view's access check uses it).
    """

    def __init__(
        self,
        address: str,
        report: Callable[[], HealthReport],
        metrics: Callable[[], str],
        *,
        routes: Sequence[BaseRoute] = (),
        middleware: Sequence[Middleware] = (),
    ) -> None:
        host, port = parse_address(address)
        try:
            self._sock = _bind(host, port)
        except OSError as exc:
            raise ConfigError(f"health.address: cannot listen on {address}: {exc}") from exc
        self.app = Starlette(
            routes=[*health_routes(report, metrics), *routes], middleware=list(middleware)
        )
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            http="h11",
            ws="none",
            # Streams (the operator view's live feed) end at shutdown instead of holding it.
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        shown = "127.0.0.1" if host == "0.0.0.0" else f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}"

    def start(self) -> None:
        """Start serving on thread ``health-http``; returns once it accepts connections.

        Raises ``ConfigError`` when the server does not come up within ``START_TIMEOUT_S``.
        """
        self._thread = threading.Thread(target=self._run, name="health-http", daemon=True)
        self._thread.start()
        started = self._server.started
        deadline = START_TIMEOUT_S
        while not started and deadline > 0 and self._thread.is_alive():
            self._thread.join(0.01)
            deadline -= 0.01
            started = self._server.started
        if not started:
            raise ConfigError(f"health.address: the server on {self.url} did not start")
        log.info("health_listening", url=f"{self.url}/healthz")

    def _run(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._sock]))

    def stop(self, timeout: float = 3.0) -> None:
        if self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(1.0)
            self._thread = None
        self._sock.close()
