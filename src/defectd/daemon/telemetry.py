"""The station's Prometheus metrics: what the daemon counts itself and what it mirrors.

Per-verdict counters and the per-stage latency histograms are updated from the result sink
(``observe``); queue depths, outbox, broker, camera and archive gauges are refreshed from the
components' own ``stats()``/``health()`` at scrape time (``collect``), so they cost nothing on
the hot path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from defectd.daemon.archive import ArchiveStats
from defectd.daemon.metrics import Registry
from defectd.engines.remote import ServerStatus
from defectd.opcua.records import OpcUaStats
from defectd.pipeline.inspection import Inspection, Verdict
from defectd.pipeline.sources import SourceHealth, SourceState
from defectd.pipeline.stats import STAGES, PipelineStats
from defectd.publish.mqtt import PublisherStats


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """The model and engine inspecting now; ``server`` for an engine whose model runs on an
    inference server (``triton``): whether that server answers."""

    model: str
    sha256: str
    engine: str
    version: str
    precision: str
    server: ServerStatus | None = None


def error_reason(inspection: Inspection) -> str:
    """The reason code of an ``error`` verdict (``rule`` is ``error:<code>``)."""
    rule = inspection.rule or ""
    return rule.split(":", 1)[1] if rule.startswith("error:") else (rule or "unknown")


class StationMetrics:
    """All ``defectd_*`` metrics of one daemon; ``registry.render()`` is the scrape."""

    def __init__(self, station: str) -> None:
        self.station = station
        r = self.registry = Registry()
        self.frames = r.counter(
            "defectd_frames_total", "Frames handed in by each camera.", ["camera"]
        )
        self.verdicts = r.counter(
            "defectd_verdicts_total", "Verdicts by camera and kind.", ["camera", "verdict"]
        )
        self.errors = r.counter(
            "defectd_errors_total",
            "Error verdicts and daemon faults by reason (queue_full, deadline, engine_error, "
            "publish ...).",
            ["reason"],
        )
        self.latency = r.histogram(
            "defectd_stage_latency_ms",
            "Per-frame latency of each pipeline stage, milliseconds (total = grab to verdict).",
            ["stage"],
        )
        self.publish_latency = r.histogram(
            "defectd_outbox_commit_ms",
            "Time to commit one verdict to the durable outbox, milliseconds.",
            buckets=(0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100),
        )
        self.queue_depth = r.gauge("defectd_queue_depth", "Frames waiting per queue.", ["queue"])
        self.queue_capacity = r.gauge(
            "defectd_queue_capacity", "Capacity of each pipeline queue.", ["queue"]
        )
        self.in_flight = r.gauge("defectd_frames_in_flight", "Frames submitted without verdict.")
        self.fps = r.gauge("defectd_fps", "Verdicts per second over the recent window.")
        self.outbox_depth = r.gauge("defectd_outbox_depth", "Messages waiting for a PUBACK.")
        self.outbox_age = r.gauge(
            "defectd_outbox_oldest_age_seconds", "Age of the oldest message in the outbox."
        )
        self.outbox_near_bound = r.gauge(
            "defectd_outbox_near_bound", "1 when the outbox is near its row or age bound."
        )
        self.broker_connected = r.gauge(
            "defectd_broker_connected", "1 while connected to the MQTT broker."
        )
        self.published = r.counter("defectd_published_total", "MQTT PUBLISH calls.")
        self.acked = r.counter("defectd_acked_total", "Messages acknowledged by the broker.")
        self.outbox_dropped = r.counter(
            "defectd_outbox_dropped_total", "Messages dropped at the outbox bound or by age."
        )
        self.client_id_clashes = r.counter(
            "defectd_mqtt_client_id_clashes_total",
            "Broker disconnects caused by another client using this station's client id.",
        )
        self.ack_latency = r.gauge(
            "defectd_ack_latency_ms",
            "Submit to PUBACK latency over the last messages, milliseconds.",
            ["quantile"],
        )
        self.camera_state = r.gauge(
            "defectd_camera_state", "1 for the state each camera is in.", ["camera", "state"]
        )
        self.camera_fps = r.gauge("defectd_camera_fps", "Frames per second per camera.", ["camera"])
        self.camera_lost = r.counter(
            "defectd_camera_frames_lost_total",
            "Frames the device sent but we never got.",
            ["camera"],
        )
        self.camera_reconnects = r.counter(
            "defectd_camera_reconnects_total", "Camera reconnects.", ["camera"]
        )
        self.camera_events = r.counter(
            "defectd_camera_events_total", "Camera events by kind.", ["camera", "kind"]
        )
        self.engine_info = r.gauge(
            "defectd_engine_info",
            "The model and engine inspecting now (value 1; the labels say which).",
            ["model", "sha256", "engine", "version", "precision"],
        )
        self.reloads = r.counter("defectd_reloads_total", "SIGHUP reloads by result.", ["result"])
        self.archive_written = r.counter("defectd_archive_written_total", "Parts archived.")
        self.archive_skipped = r.counter(
            "defectd_archive_skipped_total", "Parts not archived because its queue was full."
        )
        self.archive_bytes = r.gauge("defectd_archive_bytes", "Disk used by the image archive.")
        self.ready = r.gauge("defectd_ready", "1 once frames flow and the service is ready.")
        self.progress_age = r.gauge(
            "defectd_last_progress_age_seconds", "Seconds since the model last inspected a frame."
        )
        self.not_durable = r.counter(
            "defectd_results_not_durable_total",
            "Verdicts the outbox could not store; each was sent directly as a fail-safe reject "
            "flagged not_durable.",
        )
        self.outbox_result_age = r.gauge(
            "defectd_outbox_oldest_result_age_seconds",
            "Age of the oldest result or reject waiting for its PUBACK (0: none waiting).",
        )
        self.store_failing = r.gauge(
            "defectd_outbox_store_failing", "1 while verdicts cannot be stored in the outbox."
        )
        self.outbox_fault = r.gauge(
            "defectd_outbox_fault",
            "1 for the outbox's current storage fault (disk_full, io, damaged).",
            ["kind"],
        )
        self.disk_free = r.gauge(
            "defectd_disk_free_bytes",
            "Free bytes on the disk of each directory the daemon writes.",
            ["dir"],
        )
        self.log_suppressed = r.counter(
            "defectd_log_suppressed_total", "Repeated warnings and errors not logged."
        )
        self.opcua_events = r.counter(
            "defectd_opcua_events_total", "Verdict events emitted by the OPC UA server."
        )
        self.opcua_dropped = r.counter(
            "defectd_opcua_dropped_total",
            "Verdicts the OPC UA server never emitted: its hand-over queue was full.",
        )
        self.opcua_refused = r.counter(
            "defectd_opcua_refused_sessions_total",
            "OPC UA sessions refused (untrusted certificate, wrong user or password, anonymous).",
        )

    # -- hot path ---------------------------------------------------------------------------

    def observe(self, inspection: Inspection, commit_ms: float | None = None) -> None:
        camera = inspection.camera
        self.verdicts.inc(camera=camera, verdict=inspection.verdict.value)
        if inspection.verdict is Verdict.ERROR:
            self.errors.inc(reason=error_reason(inspection))
        for stage, ms in inspection.latencies_ms.items():
            if stage in STAGES:
                self.latency.observe(ms, stage=stage)
        if commit_ms is not None:
            self.publish_latency.observe(commit_ms)

    # -- scrape time ------------------------------------------------------------------------

    def collect(
        self,
        *,
        pipeline: PipelineStats | None,
        publisher: PublisherStats | None,
        sources: Iterable[SourceHealth],
        archive: ArchiveStats | None,
        engine: EngineInfo | None,
        ready: bool,
        progress_age_s: float | None,
        log_suppressed: int,
        disks: Mapping[str, int] | None = None,
        opcua: OpcUaStats | None = None,
    ) -> None:
        if pipeline is not None:
            for name, depth in pipeline.queues.items():
                self.queue_depth.set(depth, queue=name)
            for name, cap in pipeline.queue_capacity.items():
                self.queue_capacity.set(cap, queue=name)
            self.in_flight.set(pipeline.in_flight)
            self.fps.set(pipeline.fps)
        if publisher is not None:
            self.outbox_depth.set(publisher.outbox_depth)
            self.outbox_age.set(publisher.oldest_age_s or 0.0)
            self.outbox_near_bound.set(int(publisher.near_bound))
            self.broker_connected.set(int(publisher.connected))
            self.published.set_total(publisher.published)
            self.acked.set_total(publisher.acked)
            self.outbox_dropped.set_total(publisher.dropped)
            self.outbox_result_age.set(publisher.oldest_result_age_s or 0.0)
            self.store_failing.set(int(publisher.store_failing))
            self.outbox_fault.clear()
            if publisher.outbox_fault is not None:
                self.outbox_fault.set(1, kind=publisher.outbox_fault)
            self.client_id_clashes.set_total(publisher.client_id_clashes)
            for q, value in (
                ("0.5", publisher.ack_latency_ms_p50),
                ("0.99", publisher.ack_latency_ms_p99),
            ):
                if value is not None:
                    self.ack_latency.set(value, quantile=q)
        self.camera_state.clear()
        self.camera_fps.clear()
        for h in sources:
            for state in SourceState:
                self.camera_state.set(int(h.state is state), camera=h.camera, state=state.value)
            self.camera_fps.set(h.fps, camera=h.camera)
            self.camera_lost.set_total(h.lost, camera=h.camera)
            self.camera_reconnects.set_total(h.reconnects, camera=h.camera)
        if archive is not None:
            self.archive_written.set_total(archive.written)
            self.archive_skipped.set_total(archive.skipped_queue_full)
            self.archive_bytes.set(archive.bytes)
        if engine is not None:
            self.engine_info.clear()
            self.engine_info.set(
                1,
                model=engine.model,
                sha256=engine.sha256,
                engine=engine.engine,
                version=engine.version,
                precision=engine.precision,
            )
        self.ready.set(int(ready))
        self.progress_age.set(progress_age_s if progress_age_s is not None else -1.0)
        self.log_suppressed.set_total(log_suppressed)
        for name, free in (disks or {}).items():
            self.disk_free.set(free, dir=name)
        if opcua is not None:
            self.opcua_events.set_total(opcua.events)
            self.opcua_dropped.set_total(opcua.dropped)
            self.opcua_refused.set_total(opcua.refused_sessions)
