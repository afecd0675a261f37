"""The station's OPC UA server, as the service runs it (``[opcua]``, docs/opcua.md).

``OpcUaLink`` exists for every service and costs nothing without an ``[opcua]`` section:
``observe`` is a ``ResultRouter`` observer (a verdict is handed to the server's bounded queue,
never waited for), ``start`` imports asyncua and starts the server thread, ``tick`` refreshes
the station's status and health nodes about once a second, ``stop`` emits what is still queued
and closes the sessions. asyncua is the optional ``defectd[opcua]`` extra: a station that
enables ``[opcua]`` without it is refused at start, with the install command.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from defectd.extras import require_extra
from defectd.log import get_logger
from defectd.opcua.config import OpcUaConfig
from defectd.opcua.records import OpcUaStats, StationState
from defectd.pipeline.inspection import Inspection
from defectd.pipeline.runner import PipelineResult
from defectd.publish.triggers import TriggerMessage

if TYPE_CHECKING:
    from defectd.daemon.health import HealthReport
    from defectd.daemon.telemetry import EngineInfo
    from defectd.opcua.server import OpcUaServer
    from defectd.publish.mqtt import PublisherStats

log = get_logger(__name__)

STATE_INTERVAL_S = 1.0


class OpcUaLink:
    """Owns the OPC UA server of one service (or nothing, when ``[opcua]`` is absent)."""

    def __init__(self) -> None:
        self._server: OpcUaServer | None = None
        self._state: Callable[[], StationState] | None = None
        self._next_state = 0.0

    @property
    def server(self) -> OpcUaServer | None:
        return self._server

    def start(
        self,
        config: OpcUaConfig | None,
        station: str,
        cameras: Sequence[str],
        state: Callable[[], StationState],
    ) -> None:
        """Start the server when ``config`` enables it. Raises ``ConfigError`` (bad files),
        ``MissingExtraError`` (asyncua not installed: ``defectd[opcua]``) or ``DefectdError``
        (endpoint cannot be bound)."""
        if config is None or not config.enabled:
            return
        require_extra("opcua", "the [opcua] section (OPC UA server)")
        from defectd.opcua.server import OpcUaServer  # noqa: PLC0415  (optional extra)

        server = OpcUaServer(config, station, cameras)
        self._state = state
        server.set_state(state())
        server.start()
        self._server = server

    def set_trigger(
        self, cameras: Sequence[str], on_trigger: Callable[[TriggerMessage], None]
    ) -> None:
        """Serve the ``Trigger`` method of ``cameras`` (line mode ``plc-trigger``): each call
        becomes the trigger message the MQTT listener would hand to the line intake."""
        if self._server is None or not cameras:
            return

        def trigger(camera: str, payload: bytes, t_wall: float, t_ns: int) -> None:
            on_trigger(TriggerMessage(camera, payload, None, None, t_wall, t_ns))

        self._server.set_trigger(cameras, trigger)

    def observe(self, result: PipelineResult) -> None:
        if self._server is not None:
            self._server.submit(result.inspection)

    def submit(self, ins: Inspection) -> None:
        """A verdict that is not a pipeline result (``error:no_frame``)."""
        if self._server is not None:
            self._server.submit(ins)

    def tick(self, now: float) -> None:
        if self._server is None or self._state is None or now < self._next_state:
            return
        self._next_state = now + STATE_INTERVAL_S
        self._server.set_state(self._state())

    def stats(self) -> OpcUaStats | None:
        return self._server.stats() if self._server is not None else None

    def stop(self, status: str, timeout: float) -> None:
        """Show ``status`` (``offline``), emit what is queued, stop the server."""
        server = self._server
        if server is None:
            return
        if self._state is not None:
            server.set_state(replace(self._state(), status=status, ready=False))
        server.stop(timeout)
        self._server = None


def station_state(
    *,
    started: bool,
    stopping: bool,
    report: HealthReport,
    engine: EngineInfo | None,
    publisher: PublisherStats | None,
    config_hash: str,
) -> StationState:
    """The station nodes' values from what ``/healthz`` and the publisher say."""
    status = "stopping" if stopping else ("online" if started else "starting")
    return StationState(
        status=status,
        live=report.live,
        ready=report.ready,
        health="; ".join(report.reasons) or "ok",
        model_name=engine.model if engine is not None else "",
        model_sha256=engine.sha256 if engine is not None else "",
        engine=engine.engine if engine is not None else "",
        config_hash=config_hash,
        outbox_depth=publisher.outbox_depth if publisher is not None else 0,
        broker_connected=publisher.connected if publisher is not None else False,
    )
