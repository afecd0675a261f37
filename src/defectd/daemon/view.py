"""The operator view: a read-only web page of the station, served by the health endpoint's app.

Routes (all ``GET``):

- ``/``, ``/static/{name}``: the page (plain HTML, CSS and JavaScript shipped in the package);
- ``/api/live``: Server-Sent Events: ``frame`` (a camera's newest encoded part: verdict, part
  id, defects in px and mm², latency, image URL) and ``station`` (the panel's numbers, once a
  second); a connected stream is a viewer of the ``LiveFeed``;
- ``/api/frame/{camera}.jpg``: that camera's newest encoded image;
- ``/api/station``: the panel's numbers once;
- ``/api/rejects``, ``/api/rejects/{stem}``, ``/api/rejects/{stem}/overlay.jpg``: the newest
  fail/error parts of the image archive, one part's archived result, its overlay image.

Access: with a token (required by the config when the endpoint is not bound to loopback), every
view route asks for it, as ``Authorization: Bearer``, or once as ``?token=`` which sets an
HttpOnly cookie holding a digest of it and redirects to the same page without it. The token is
never written into a page, a response or a log. ``/healthz``, ``/livez`` and ``/metrics`` stay
open to probes and scrapers, as before.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import cv2
import numpy as np
from pydantic import SecretStr
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from defectd.daemon.config import HealthSection
from defectd.daemon.health import HealthReport
from defectd.daemon.live import LiveFeed, encode_jpeg
from defectd.daemon.routing import ProgressSnapshot
from defectd.log import get_logger
from defectd.pipeline.cameras import CameraSetup

log = get_logger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/health", "/livez", "/metrics"})
COOKIE = "defectd_view"
STATION_EVERY_S = 1.0
# How often a stream looks for a newer image: well under the feed's 1 / view_fps, and few
# enough wake-ups that the server's thread stays out of the inspection threads' way.
STREAM_TICK_S = 0.2
_STATIC = {"view.js": "text/javascript", "view.css": "text/css", "index.html": "text/html"}
_STEM = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_NO_STORE = {"Cache-Control": "no-store"}


def session_value(token: SecretStr) -> str:
    """What the cookie holds: a digest of the token, so the browser never stores the token."""
    key = token.get_secret_value().encode()
    return hmac.new(key, b"defectd operator view", hashlib.sha256).hexdigest()


class TokenGate:
    """ASGI middleware: the view's routes need the token; the probes and ``/metrics`` do not."""

    def __init__(self, app: ASGIApp, token: SecretStr) -> None:
        self.app = app
        self._token = token.get_secret_value().encode()
        self._session = session_value(token).encode()

    def _allowed(self, request: Request) -> bool:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return hmac.compare_digest(auth[7:].strip().encode(), self._token)
        cookie = request.cookies.get(COOKIE, "")
        return bool(cookie) and hmac.compare_digest(cookie.encode(), self._session)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        given = request.query_params.get("token")
        if given is not None and hmac.compare_digest(given.encode(), self._token):
            # Trade the token in the address for a cookie, and drop it from the address bar.
            kept = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            rest = urlencode(kept)
            target = request.url.path + (f"?{rest}" if rest else "")
            response: Response = RedirectResponse(target, status_code=303)
            response.set_cookie(
                COOKIE, self._session.decode(), httponly=True, samesite="strict", path="/"
            )
            await response(scope, receive, send)
            return
        if self._allowed(request):
            await self.app(scope, receive, send)
            return
        log.warning("view_access_denied", path=scope["path"], client=_client(scope))
        body = (
            "<!doctype html><title>defectd</title><p>This station's view needs its access "
            "token: open it as <code>/?token=&lt;token&gt;</code>.</p>"
        )
        await Response(body, status_code=401, media_type="text/html", headers=_NO_STORE)(
            scope, receive, send
        )


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


class RejectGallery:
    """The newest fail/error parts of an image archive (``results/<stem>.json``, overlays).

    Stems start with the grab time, so the newest are the last in name order. Summaries and
    thumbnails are cached (small, bounded); a part the archive pruned drops out on the next
    listing.
    """

    def __init__(self, root: Path | None, size: int) -> None:
        self.root = root
        self.size = size
        self._lock = threading.Lock()
        self._summaries: dict[str, dict[str, Any] | None] = {}
        self._thumbs: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    def _result(self, stem: str) -> dict[str, Any] | None:
        if self.root is None or not _STEM.match(stem):
            return None
        try:
            data = json.loads((self.root / "results" / f"{stem}.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def recent(self) -> list[dict[str, Any]]:
        """Summaries of the newest ``size`` fail/error parts, newest first."""
        if self.root is None:
            return []
        try:
            names = sorted(
                (p.name[:-5] for p in (self.root / "results").iterdir() if p.suffix == ".json"),
                reverse=True,
            )
        except OSError:
            return []
        out: list[dict[str, Any]] = []
        with self._lock:
            for stem in names[: self.size * 20]:
                if stem not in self._summaries:
                    self._summaries[stem] = _summary(self._result(stem))
                summary = self._summaries[stem]
                if summary is not None:
                    out.append(summary)
                    if len(out) >= self.size:
                        break
            if len(self._summaries) > self.size * 40:
                keep = set(names[: self.size * 20])
                self._summaries = {k: v for k, v in self._summaries.items() if k in keep}
        return out

    def result(self, stem: str) -> dict[str, Any] | None:
        return self._result(stem)

    def overlay_jpeg(self, stem: str, width: int) -> bytes | None:
        """The part's overlay (or its image when it has none) as JPEG, at most ``width`` wide."""
        if self.root is None or not _STEM.match(stem):
            return None
        key = (stem, width)
        with self._lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        for sub in ("overlays", "images"):
            path = self.root / sub / f"{stem}.png"
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is not None:
                break
        else:
            return None
        h, w = image.shape[:2]
        if w > width:
            size = (width, max(1, round(h * width / w)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        jpeg = encode_jpeg(np.ascontiguousarray(image))
        with self._lock:
            self._thumbs[key] = jpeg
            while len(self._thumbs) > 4 * self.size:
                self._thumbs.popitem(last=False)
        return jpeg


def _summary(result: dict[str, Any] | None) -> dict[str, Any] | None:
    if result is None or result.get("verdict") not in ("fail", "error"):
        return None
    defects = result.get("defects") or []
    return {
        "stem": result.get("stem"),
        "camera": result.get("camera"),
        "seq": result.get("seq"),
        "part_id": result.get("part_id"),
        "result_id": result.get("result_id"),
        "verdict": result.get("verdict"),
        "rule": result.get("rule"),
        "t_grab_wall": result.get("t_grab_wall"),
        "defects": len(defects),
    }


class _Cached:
    """``fn()`` computed at most once per ``max_age_s`` (monotonic), shared by all callers."""

    def __init__(self, fn: Callable[[], dict[str, Any]], max_age_s: float) -> None:
        self._fn = fn
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._value: dict[str, Any] | None = None
        self._at = 0.0

    def __call__(self) -> dict[str, Any]:
        with self._lock:
            now = time.monotonic()
            if self._value is None or now - self._at >= self._max_age_s:
                self._value = self._fn()
                self._at = now
            return self._value


def _sse(event: str, data: Mapping[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n"


def _json(data: Any, status: int = 200) -> Response:
    body = json.dumps(data, default=str).encode()
    return Response(body, status_code=status, media_type="application/json", headers=_NO_STORE)


def view_routes(
    feed: LiveFeed,
    station: Callable[[], dict[str, Any]],
    gallery: RejectGallery,
) -> list[BaseRoute]:
    """The operator view's routes; ``station()`` gives the panel's numbers (thread-safe).

    The panel is computed at most once per ``STATION_EVERY_S`` whatever the number of viewers.
    """
    station = _Cached(station, STATION_EVERY_S / 2)

    def static(request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        if name not in _STATIC:
            return Response("not found\n", status_code=404, media_type="text/plain")
        text = resources.files("defectd.daemon").joinpath("view_static", name).read_bytes()
        return Response(text, media_type=_STATIC[name], headers=_NO_STORE)

    def station_once(request: Request) -> Response:
        return _json(station())

    def frame(request: Request) -> Response:
        live = feed.frame(request.path_params["camera"])
        if live is None or not live.jpeg:
            return Response("no image yet\n", status_code=404, media_type="text/plain")
        return Response(live.jpeg, media_type="image/jpeg", headers=_NO_STORE)

    def rejects(request: Request) -> Response:
        return _json({"rejects": gallery.recent(), "archive": gallery.root is not None})

    def reject(request: Request) -> Response:
        result = gallery.result(request.path_params["stem"])
        return _json(result) if result is not None else _json({"error": "no such part"}, 404)

    def overlay(request: Request) -> Response:
        try:
            width = min(max(int(request.query_params.get("w", "1024")), 32), 4096)
        except ValueError:
            width = 1024
        jpeg = gallery.overlay_jpeg(request.path_params["stem"], width)
        if jpeg is None:
            return Response("no such part\n", status_code=404, media_type="text/plain")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    async def live(request: Request) -> Response:
        return StreamingResponse(
            _stream(feed, station),
            media_type="text/event-stream",
            headers={**_NO_STORE, "X-Accel-Buffering": "no"},
        )

    return [
        Route("/", static),
        Route("/static/{name}", static),
        Route("/api/station", station_once),
        Route("/api/live", live),
        Route("/api/frame/{camera}.jpg", frame),
        Route("/api/rejects", rejects),
        Route("/api/rejects/{stem}", reject),
        Route("/api/rejects/{stem}/overlay.jpg", overlay),
    ]


async def _stream(feed: LiveFeed, station: Callable[[], dict[str, Any]]) -> AsyncIterator[str]:
    """One viewer's events: each camera's newest image once, the panel once a second.

    The stream is a viewer for as long as it runs; it ends when the feed stops (shutdown) and
    is cancelled by the server when the browser goes away.
    """
    feed.subscribe()
    loop = asyncio.get_running_loop()
    try:
        yield "retry: 2000\n\n"
        sent: dict[str, int] = {}
        next_station = 0.0
        while not feed.stopped:
            for camera, live in sorted(feed.frames().items()):
                if sent.get(camera) != live.version:
                    sent[camera] = live.version
                    image = f"/api/frame/{camera}.jpg?v={live.version}" if live.jpeg else None
                    yield _sse("frame", {**live.info, "version": live.version, "image": image})
            now = loop.time()
            if now >= next_station:
                next_station = now + STATION_EVERY_S
                yield _sse("station", await asyncio.to_thread(station))
            await asyncio.sleep(STREAM_TICK_S)
    finally:
        feed.unsubscribe()


def station_panel(
    *,
    station: str,
    version: str,
    now_wall: float,
    report: HealthReport,
    progress: ProgressSnapshot,
    fps: float,
    broker_address: str,
    calibration: Mapping[str, tuple[Path | None, CameraSetup]],
    model_sha256: str,
    events: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """The station panel's numbers from what the service gathered: a pure function.

    ``calibration`` maps each camera to its calibration file (or None) and its setup; the
    panel's ``alarms`` are the health report's reasons (every rule that keeps it from ready).
    """
    checks = report.checks
    cal: dict[str, Any] = {}
    for camera, (path, setup) in calibration.items():
        cal[camera] = {
            "file": path.name if path is not None else None,
            "mm_per_px": setup.mm_per_px,
            "threshold": setup.threshold,
            "min_area_px": setup.min_area_px,
            "applies": setup.calibrated_for(model_sha256),
        }
    return {
        "station": station,
        "version": version,
        "time": now_wall,
        "ready": report.ready,
        "live": report.live,
        "alarms": list(report.reasons),
        "fps": round(fps, 2),
        "results": progress.results,
        "verdicts": dict(progress.verdicts),
        "broker": {**checks.get("broker", {}), "address": broker_address},
        "outbox": checks.get("outbox", {}),
        "cameras": checks.get("cameras", {}),
        "engine": checks.get("engine"),
        "calibration": cal,
        "events": list(events),
    }


class OperatorView:
    """What the service holds for the view: the live feed (a result observer), the reject
    gallery over the archive folder (None: archive off) and the access rule of ``[health]``."""

    def __init__(self, health: HealthSection, archive_dir: Path | None) -> None:
        self.health = health
        self.feed = LiveFeed(max_fps=health.view_fps, width=health.view_width)
        self.gallery = RejectGallery(archive_dir, health.gallery)

    def mount(
        self, station: Callable[[], dict[str, Any]]
    ) -> tuple[list[BaseRoute], list[Middleware]]:
        """Routes and middleware for the health endpoint's app.

        Raises ``ConfigError`` naming ``health.token_file``/``token_env`` when the configured
        token cannot be read.
        """
        token = self.health.read_token()
        middleware = [Middleware(TokenGate, token=token)] if token is not None else []
        return view_routes(self.feed, station, self.gallery), middleware

    def stop(self) -> None:
        """End the viewers' streams and the encoder (before the server stops)."""
        self.feed.stop()
